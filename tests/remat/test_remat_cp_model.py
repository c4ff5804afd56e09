"""The CP model's tightening (live-set cuts, no-gap, read copies), its complete warm
start, the low-memory order, the lower-bound proof, timeouts and statelessness."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from qdeploy.compiler.errors import UnsupportedError
from qdeploy.passes import remat as R
from qdeploy.passes.memory import min_feasible_bytes

from ..conftest import REPO
from .graphs import skip_block, two_skips

sys.path.insert(0, str(REPO))


def _copies(p, sched):
    return np.bincount([v for v, _ in sched.steps], minlength=p.n)


def _check_cuts(p, budget, sched, C=2):
    """Every schedule that meets ``budget`` with <= C runs per node satisfies every live-set cut."""
    cps = _copies(p, sched)
    assert cps.max() <= C
    cuts = R.live_cuts(p, budget, [1 if v in p.outputs else C for v in range(p.n)])
    for const, ks in cuts:
        recomputed = sum(sz for u, sz in ks if cps[u] >= 2)
        assert recomputed >= const + sum(sz for _, sz in ks) - budget
    return cuts


def test_live_cuts_hold_for_every_feasible_schedule_and_keep_the_optimum():
    from benchmarks.remat_graphs import training, vgg16
    p = training(vgg16())
    base = R.evaluate(p, R.no_remat(p))
    b = int(0.8 * base.peak)
    g = R.solve_greedy(p, b)
    tight = R.solve_cp(p, b, time_limit=120, hint=g.schedule, workers=2)
    loose = R.solve_cp(p, b, time_limit=120, hint=g.schedule, workers=2, tighten=False)
    assert g.feasible and tight.status == "optimal" and loose.status == "optimal"
    assert tight.cost == loose.cost  # the cuts remove no optimal schedule
    assert tight.cost <= g.cost
    # the no-remat schedule breaks the budget, so some cut demands a recomputation ...
    cuts = _check_cuts(p, b, tight.schedule)
    assert cuts and any(const + sum(sz for _, sz in ks) > b for const, ks in cuts)
    # ... and the greedy's and the loose model's schedules (other feasible points) satisfy them too
    _check_cuts(p, b, g.schedule)
    _check_cuts(p, b, loose.schedule)
    assert "proven optimal" in tight.notes[0]


@pytest.mark.parametrize("make", [skip_block, two_skips])
def test_tightening_keeps_the_optimum_on_ir_graphs(make):
    p = R.Problem.from_graph(make(np.random.default_rng(7)))
    b = int(0.9 * R.evaluate(p, R.no_remat(p)).peak)
    a = R.solve_cp(p, b, time_limit=60, workers=2, tighten=R.TIGHTENINGS)  # every tightening
    c = R.solve_cp(p, b, time_limit=60, workers=2, tighten=False)
    d = R.solve_cp(p, b, time_limit=60, workers=2)  # the default ones
    assert a.status == c.status == d.status == "optimal" and a.cost == c.cost == d.cost
    with pytest.raises(ValueError, match="unknown tightening"):
        R.solve_cp(p, b, time_limit=1, tighten=("cuts", "magic"))
    # no gaps and no unread recomputation in the tightened model's schedule
    ev = R.evaluate(p, a.schedule)
    read = {r for _, rs in a.schedule.steps for r in rs}
    assert all(t in read or v in p.outputs for t, (v, _) in enumerate(a.schedule.steps) if p.users[v])
    assert ev.peak <= b


def test_complete_warm_start_is_accepted_as_is():
    """Every model variable is hinted: with the variables fixed to the hint, CP-SAT must find
    exactly the hint (a missing or inconsistent hint makes this infeasible)."""
    from benchmarks.remat_graphs import training, vgg16
    p = training(vgg16())
    b = int(0.8 * R.evaluate(p, R.no_remat(p)).peak)
    g = R.solve_greedy(p, b)
    r = R.solve_cp(p, b, time_limit=60, hint=g.schedule, workers=1,
                   params={"fix_variables_to_their_hinted_value": True})
    assert r.status == "optimal" and r.cost == g.cost and r.peak == g.peak


def test_low_memory_order_is_a_valid_order_that_lowers_the_peak():
    from benchmarks.remat_graphs import random_layered
    p = random_layered(100, seed=100)
    s = R.low_memory_order(p)
    ev = R.evaluate(p, s)  # raises on an invalid schedule
    base = R.evaluate(p, R.no_remat(p))
    assert sorted(v for v, _ in s.steps) == list(range(p.n))  # no recomputation
    assert ev.cost == base.cost and ev.peak < base.peak
    # the greedy starts from it: a budget the order alone meets needs no recomputation
    g = R.solve_greedy(p, ev.peak)
    assert g.feasible and g.cost == base.cost and g.peak <= ev.peak < base.peak


def test_milp_in_a_given_order_maps_back():
    from benchmarks.remat_graphs import random_layered, training
    p = training(random_layered(8, seed=3))
    low = R.low_memory_order(p)
    order = [v for v, _ in low.steps][::-1]
    with pytest.raises(ValueError, match="reads node"):  # reversed: not topological
        p.reordered(order)
    order = order[::-1]
    q = p.reordered(order)
    assert [q.names[k] for k in range(q.n)] == [p.names[v] for v in order]
    b = R.evaluate(p, low).peak  # met by the order without recomputation
    m = R.solve_milp(p, b, time_limit=30, order=order)
    assert m.feasible and R.evaluate(p, m.schedule).peak == m.peak <= b
    assert m.cost == R.evaluate(p, low).cost and "given order" in m.notes[-1]
    with pytest.raises(ValueError, match="permutation"):
        p.reordered(order[:-1])


def test_lower_bound_proof_names_the_node():
    from benchmarks.remat_graphs import resnet50, vgg16
    p = vgg16()
    lb, why = p.lower_bound_why()
    assert lb == R.evaluate(p, R.no_remat(p)).peak == 2 * 224 * 224 * 64
    assert "block1_conv2" in why and f"{224 * 224 * 64} B" in why
    lb, why = resnet50().lower_bound_why()
    assert lb == 3 * 56 * 56 * 256 and "conv2_block1_add" in why and "2 x 802816 B" in why
    # the IR-level bound and the Problem-level bound agree
    g = skip_block(np.random.default_rng(7))
    assert R.Problem.from_graph(g).lower_bound() == min_feasible_bytes(g)[0]


def test_benchmark_graph_counts_match_checkmate():
    from benchmarks.remat_graphs import CHECKMATE_COUNTS, all_graphs
    seen = 0
    for p in all_graphs((100,)):
        want = CHECKMATE_COUNTS.get(p.title)
        if want:
            assert p.n == want[0], p.title
            assert want[1] is None or p.edges == want[1], p.title
            seen += 1
    assert seen == len(CHECKMATE_COUNTS)


def test_solver_limit_returns_best_schedule_not_proven_optimal():
    from benchmarks.remat_graphs import training, vgg16
    p = training(vgg16())
    b = int(0.8 * R.evaluate(p, R.no_remat(p)).peak)
    g = R.solve_greedy(p, b)
    # stopped before any search: the warm start is returned, flagged not proven optimal
    r = R.solve_cp(p, b, time_limit=30, hint=g.schedule, workers=1, params={"max_deterministic_time": 0.0})
    assert r.status == "feasible" and r.feasible and r.cost == g.cost
    assert "not proven optimal" in r.notes[0]
    # stopped after the first solutions (no conflicts allowed): best found, with a lower bound
    r = R.solve_cp(p, b, time_limit=30, hint=g.schedule, workers=1, params={"max_number_of_conflicts": 0})
    if r.status == "feasible":  # (presolve may close the gap on its own)
        assert r.cost <= g.cost and r.bound is not None and r.bound <= r.cost
        assert "not proven optimal" in r.notes[0]


def test_pass_reports_not_proven_optimal_on_solver_limit(monkeypatch):
    g = two_skips(np.random.default_rng(7))
    real = R.solve_cp

    def limited(*a, **kw):
        kw["params"] = {"max_deterministic_time": 0.0}
        return real(*a, **kw)
    from qdeploy.passes.remat import driver
    monkeypatch.setattr(driver, "solve_cp", limited)  # the solver rematerialize calls
    g2, rep = R.rematerialize(g, 0.9, time_limit=5)
    assert rep["status"] == "feasible" and rep["proven_optimal"] is False
    assert rep["peak_after"] <= rep["budget_bytes"]
    assert any("not proven optimal" in n for n in rep["notes"])


def test_inference_graphs_are_stateless(tmp_path):
    from tests.bad_inputs.builders import _bn_training, f32, model, save

    import qdeploy
    from onnx import helper
    # every IR op is stateless; a node flagged stateful (or of an unknown op) is refused
    g = skip_block(np.random.default_rng(7))
    R.assert_stateless(g)
    bad = g.with_(nodes=[n.replace(attrs={**n.attrs, "stateful": True}) if n.name == "conv_b" else n
                         for n in g.nodes])
    with pytest.raises(UnsupportedError, match="conv_b"):
        R.Problem.from_graph(bad)
    # batch norm in training mode (it would update running statistics) never reaches the pass
    path = save(_bn_training(), tmp_path / "bn_train.onnx")
    with pytest.raises(UnsupportedError, match="training"):
        qdeploy.compile(str(path), target="reference", out_dir=tmp_path / "out", memory_budget="0.8")
    # in eval mode it is imported as a stateless op (frozen statistics) the pass may recompute
    bn = {k: f32(np.full(3, 0.5 + i / 10)) for i, k in enumerate(("g", "b", "m", "v"))}
    m = model([helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], name="bn_eval")],
              [1, 3, 4, 4], bn, opset=15)
    ge = qdeploy.load(str(save(m, tmp_path / "bn_eval.onnx")))
    R.assert_stateless(ge)
    assert all(n.op in R.STATELESS_OPS for n in ge.nodes)
