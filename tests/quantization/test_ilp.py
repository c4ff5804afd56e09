"""Bit-allocation ILP: equals brute force on the jet tagger (625 combinations); errors; ties; cost hook."""
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from qdeploy.compiler.errors import QDeployError
from qdeploy.compiler.quantization import ilp
from qdeploy.compiler.quantization.hutchinson import hutchinson_traces
from qdeploy.compiler.quantization.search import check_ties, compute_sensitivities, layer_specs
from qdeploy.compiler.quantization.search_budget import parse_search_budget

DIMS = [16, 64, 32, 32, 5]


@pytest.fixture(scope="module")
def jet():
    """Jet tagger 16-64-32-32-5 with Hessian sensitivities from a short trace on random data."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                      nn.Linear(32, 5))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    y = torch.randint(0, 5, (256,), generator=g)
    specs = layer_specs(m, x, w_bits=(4, 5, 6, 7, 8), a_bits=(), input_bits=8)
    tr = hutchinson_traces(m, (x, y), max_probes=20, seed=0)
    sens = compute_sensitivities(m, specs, tr, x)
    return m, specs, sens


def _range(specs, kind):
    lo = sum(min(ilp.layer_cost(kind, s, *o) for o in s.options()) for s in specs)
    hi = sum(max(ilp.layer_cost(kind, s, *o) for o in s.options()) for s in specs)
    return lo, hi


def test_specs_of_jet_tagger(jet):
    _, specs, sens = jet
    assert [(s.n_in, s.n_out) for s in specs] == list(zip(DIMS[:-1], DIMS[1:]))
    assert int(np.prod([len(s.options()) for s in specs])) == 625
    s = specs[0]
    # BOPs formula of ../shared/refs/README.md (arXiv 2103.05579 Eq. 1), unpruned
    assert ilp.layer_cost("bops", s, 6, 8) == 64 * 16 * (8 * 6 + 8 + 6 + 4)
    assert ilp.layer_cost("size", s, 6, 8) == 16 * 64 * 6


@pytest.mark.parametrize("kind", ["bops", "size"])
def test_ilp_equals_brute_force(jet, kind):
    _, specs, sens = jet
    lo, hi = _range(specs, kind)
    for b in np.linspace(lo, hi, 9):
        a = ilp.allocate(specs, sens, {kind: float(b)})
        bf = ilp.brute_force(specs, sens, {kind: float(b)})
        assert a.costs[kind] <= b * (1 + 1e-9)
        assert a.objective == pytest.approx(bf.objective, rel=1e-9, abs=0), (kind, b)


def test_ilp_equals_brute_force_two_budgets_and_ties(jet):
    _, specs, sens = jet
    blo, bhi = _range(specs, "bops")
    slo, shi = _range(specs, "size")
    for fb, fs in itertools.product([0.2, 0.5, 0.8], [0.3, 0.7]):
        budgets = {"bops": blo + fb * (bhi - blo), "size": slo + fs * (shi - slo)}
        for ties in ([], [["2", "4"]]):
            try:
                bf = ilp.brute_force(specs, sens, budgets, ties=ties)
            except QDeployError:
                with pytest.raises(QDeployError, match="no bit allocation"):
                    ilp.allocate(specs, sens, budgets, ties=ties)
                continue
            a = ilp.allocate(specs, sens, budgets, ties=ties)
            assert a.objective == pytest.approx(bf.objective, rel=1e-9)
            if ties:
                assert a.bits["2"][0] == a.bits["4"][0]


def test_activation_bits_and_custom_cost_hook():
    specs = [ilp.LayerSpec("a", 16, 8, n_weights=128, w_bits=(2, 4, 8), a_bits=(), fixed_a_bits=8),
             ilp.LayerSpec("b", 8, 4, n_weights=32, w_bits=(2, 4, 8), a_bits=(2, 4, 8))]
    rng = np.random.default_rng(0)
    sens = {s.name: {o: float(rng.uniform()) / (o[0] * o[1]) for o in s.options()} for s in specs}
    lut = lambda s, w, a: s.n_weights * w * a / 8.0  # a stand-in for backends/hls4ml/estimate.py
    for budget in (300.0, 500.0, 900.0):
        a = ilp.allocate(specs, sens, {"lut": budget}, costs={"lut": lut})
        bf = ilp.brute_force(specs, sens, {"lut": budget}, costs={"lut": lut})
        assert a.objective == pytest.approx(bf.objective, rel=1e-9)
        assert a.costs["lut"] <= budget
    ilp.register_cost("lut_test", lut)
    assert ilp.allocate(specs, sens, {"lut_test": 500.0}).costs["lut_test"] <= 500.0


def test_pareto_frontier_monotone(jet):
    _, specs, sens = jet
    pts = ilp.pareto_frontier(specs, sens, "bops", points=15)
    assert len(pts) >= 3
    costs = [p.costs["bops"] for p in pts]
    objs = [p.objective for p in pts]
    assert costs == sorted(costs) and objs == sorted(objs, reverse=True)


def test_bad_settings_errors(jet):
    m, specs, sens = jet
    lo, _ = _range(specs, "bops")
    with pytest.raises(QDeployError, match="below the cost of the all-minimum-bits allocation"):
        ilp.allocate(specs, sens, {"bops": lo * 0.9})
    with pytest.raises(QDeployError, match="empty"):
        layer_specs(m, torch.zeros(1, 16), w_bits=[])
    bad = [ilp.LayerSpec("x", 4, 4, w_bits=())]
    with pytest.raises(QDeployError, match="empty"):
        ilp.allocate(bad, {"x": {}}, {})
    with pytest.raises(QDeployError, match="has no weights"):
        check_ties(m, [["0", "1"]])  # module "1" is a ReLU
    with pytest.raises(QDeployError, match="not a layer with weights"):
        ilp.allocate(specs, sens, {}, ties=[["0", "1"]])
    with pytest.raises(QDeployError, match="unknown budget"):
        ilp.allocate(specs, sens, {"luts": 1.0})
    with pytest.raises(QDeployError, match="kind=value"):
        parse_search_budget("bops")
    assert parse_search_budget("bops=1e6,size=uniform:4") == {"bops": 1e6, "size": "uniform:4"}


def test_sixty_layers_fast():
    rng = np.random.default_rng(0)
    specs = [ilp.LayerSpec(f"l{i}", 64, 64, n_weights=4096, w_bits=tuple(range(2, 9))) for i in range(60)]
    sens = {s.name: {o: float(rng.uniform(0.5, 2)) * 4.0 ** -o[0] for o in s.options()} for s in specs}
    lo, hi = _range(specs, "bops")
    a = ilp.allocate(specs, sens, {"bops": (lo + hi) / 2})
    assert a.costs["bops"] <= (lo + hi) / 2 * (1 + 1e-9)


# ----------------------------------------------------------------------------- pairwise costs
def _pair_chain(seed=0):
    """4-layer chain, weights 2/4/8 and activations 2/4/8 (first layer's fixed): 3*9*9*9 = 2187
    allocations; a unary LUT-like cost plus a pair cost that grows with the previous layer's
    accumulator width (w+a of the previous layer) times the next layer's activation bits."""
    rng = np.random.default_rng(seed)
    specs = [ilp.LayerSpec("l0", 16, 8, n_weights=128, w_bits=(2, 4, 8), a_bits=(), fixed_a_bits=6)] + \
            [ilp.LayerSpec(f"l{i}", 8, 8, n_weights=64, w_bits=(2, 4, 8), a_bits=(2, 4, 8)) for i in (1, 2, 3)]
    sens = {s.name: {o: float(rng.uniform(0.5, 2)) * 4.0 ** -o[0] * 2.0 ** -o[1] for o in s.options()}
            for s in specs}
    wgt = {s.name: float(rng.uniform(1, 3)) for s in specs}
    unary = lambda s, w, a: s.n_weights * w * a / 8.0
    pair = lambda p, po, s, o: wgt[s.name] * 8 * (po[0] + po[1]) * o[1]
    return specs, sens, ilp.PairCost(unary, pair), unary


def _brute_min_max(specs, kind, costs):
    vals = [ilp.total_cost(kind, specs, {s.name: o for s, o in zip(specs, combo)}, costs)
            for combo in itertools.product(*[s.options() for s in specs])]
    return min(vals), max(vals)


def test_pair_costs_ilp_equals_brute_force_and_change_the_optimum():
    specs, sens, lut, unary = _pair_chain()
    costs = {"lut": lut}
    lo, hi = ilp.cost_range("lut", specs, costs)
    assert (lo, hi) == pytest.approx(_brute_min_max(specs, "lut", costs), rel=1e-12)
    changed = 0
    for frac in (0.0, 0.05, 0.15, 0.3, 0.5, 0.75, 1.0):
        b = lo + frac * (hi - lo)
        a = ilp.allocate(specs, sens, {"lut": b}, costs=costs)
        bf = ilp.brute_force(specs, sens, {"lut": b}, costs=costs)
        assert a.objective == pytest.approx(bf.objective, rel=1e-9)
        assert a.costs["lut"] == pytest.approx(ilp.total_cost("lut", specs, a.bits, costs))
        assert a.costs["lut"] <= b * (1 + 1e-9)
        # the same budget on the unary part alone: a different optimum, over budget once pairs count
        u = ilp.allocate(specs, sens, {"lut": b}, costs={"lut": unary})
        if u.bits != a.bits:
            changed += 1
            assert ilp.total_cost("lut", specs, u.bits, costs) > b
    assert changed >= 2


def test_pair_costs_with_a_second_budget_and_ties():
    specs, sens, lut, _ = _pair_chain(1)
    costs = {"lut": lut}
    lo, hi = ilp.cost_range("lut", specs, costs)
    blo, bhi = ilp.cost_range("bops", specs)
    for fl, fb in itertools.product([0.2, 0.6], [0.3, 0.8]):
        budgets = {"lut": lo + fl * (hi - lo), "bops": blo + fb * (bhi - blo)}
        for ties in ([], [["l1", "l3"]]):
            try:
                bf = ilp.brute_force(specs, sens, budgets, costs=costs, ties=ties)
            except QDeployError:
                with pytest.raises(QDeployError, match="no bit allocation"):
                    ilp.allocate(specs, sens, budgets, costs=costs, ties=ties)
                continue
            a = ilp.allocate(specs, sens, budgets, costs=costs, ties=ties)
            assert a.objective == pytest.approx(bf.objective, rel=1e-9)
            assert a.costs["lut"] <= budgets["lut"] * (1 + 1e-9)


def test_unary_only_unchanged_and_zero_pairs_equal_plain(jet):
    _, specs, sens = jet
    lo, hi = _range(specs, "bops")
    assert ilp.cost_range("bops", specs) == pytest.approx((lo, hi), rel=1e-12)
    zero = ilp.PairCost(lambda s, w, a: ilp.layer_cost("bops", s, w, a), lambda p, po, s, o: 0.0)
    for b in np.linspace(lo, hi, 5):
        a = ilp.allocate(specs, sens, {"bops": float(b)})
        z = ilp.allocate(specs, sens, {"hw": float(b)}, costs={"hw": zero})
        assert a.bits == z.bits and a.costs["bops"] == z.costs["bops"] == ilp.total_cost("bops", specs, a.bits)
    ua = ilp.uniform_allocation(specs, 6, sens)
    assert ua.costs["bops"] == sum(ilp.layer_cost("bops", s, *ua.bits[s.name]) for s in specs)


def test_all_minimum_check_counts_pair_costs():
    specs, sens, lut, unary = _pair_chain()
    costs = {"lut": lut}
    lo, _ = ilp.cost_range("lut", specs, costs)
    unary_lo = sum(min(unary(s, *o) for o in s.options()) for s in specs)
    assert lo > unary_lo * 1.5
    with pytest.raises(QDeployError, match="below the cost of the all-minimum-bits allocation"):
        ilp.allocate(specs, sens, {"lut": (lo + unary_lo) / 2}, costs=costs)
    a = ilp.allocate(specs, sens, {"lut": lo}, costs=costs)
    assert a.costs["lut"] == pytest.approx(lo)
    pts = ilp.pareto_frontier(specs, sens, "lut", points=8, costs=costs)
    assert pts and pts[0].costs["lut"] == pytest.approx(lo)
    assert all(p.costs["lut"] == pytest.approx(ilp.total_cost("lut", specs, p.bits, costs)) for p in pts)
    # a failing pair cost names both layers
    bad = ilp.PairCost(unary, lambda p, po, s, o: 1 / 0)
    with pytest.raises(QDeployError, match="'l0' and 'l1'"):
        ilp.total_cost("lut", specs, {s.name: s.options()[0] for s in specs}, {"lut": bad})
    with pytest.raises(QDeployError, match="layer 'l1': no bit widths"):
        ilp.total_cost("lut", specs, {"l0": (2, 6)}, costs)
