"""FPGA budgets (issue 5 item 4 / issue 4 item 2): per-layer LUT/DSP/latency costs from the hls4ml
estimator in the bit-allocation ILP -- the budget holds on the whole-model estimate, and the ILP
equals brute force on an enumerable case."""
import numpy as np
import pytest
import torch
from torch import nn

from qdeploy.backends.hls4ml.estimate import estimate
from qdeploy.compiler.errors import QDeployError
from qdeploy.compiler.ir import Const, FixedType, GraphBuilder
from qdeploy.compiler.quantization import hw_costs, ilp, sensitivity
from qdeploy.compiler.quantization.hessian import hutchinson_traces, layer_inputs
from qdeploy.compiler.quantization.search import compute_sensitivities, layer_specs, parse_budget

INP = {"bits": 6, "scale": 2.0 ** -4, "signed": False}


@pytest.fixture(scope="module")
def tiny():
    """16-12-8-4 MLP; weights 2/4/8 bits, activations 3/6 bits: 3 * 6 * 6 = 108 allocations."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(128, 16, generator=g) * 3
    y = torch.randint(0, 4, (128,), generator=g)
    specs = layer_specs(m, x, w_bits=(2, 4, 8), a_bits=(3, 6), input_bits=INP["bits"])
    tr = hutchinson_traces(m, (x, y), activations=[s.name for s in specs if s.a_bits], max_probes=20, seed=0)
    sens = compute_sensitivities(m, specs, tr, x)
    costs = hw_costs.estimator_costs(m, specs, x, INP, {"part": "xcvu9p", "clock_period": 5.0})
    return m, x, specs, sens, costs


def whole_model_graph(m, x, bits):
    """The full IR graph of the allocation (Dense -> Relu -> Quantize to the next layer's input type)."""
    names = [n for n, mm in m.named_children() if isinstance(mm, nn.Linear)]
    acts = layer_inputs(m, x, names)
    b = GraphBuilder("mlp")
    h = b.input("x", (m[0].in_features,), FixedType(INP["bits"], INP["bits"] - 4, False))
    for i, n in enumerate(names):
        wb, ab = bits[n]
        if i > 0:
            _, s = sensitivity.quantize_act_pot(acts[n], ab, False)
            f = int(round(-np.log2(s)))
            h = b.add(f"relu{i}", "Relu", [h])
            h = b.add(f"q{i}", "Quantize", [h], attrs={"to": FixedType(ab, ab - f, False)})
            xf = f
        else:
            xf = 4
        lg = hw_costs.layer_graph(dict(m.named_modules())[n], (acts[n].shape[1],), wb, 0 + (ab if i else INP["bits"]),
                                  xf)
        node = lg.node("layer")
        h = b.add(f"fc_{n}", "Dense", [h], params=dict(node.params))
    b.output(h)
    return b.build()


def _range(specs, kind, costs):
    lo = sum(min(ilp.layer_cost(kind, s, *o, costs) for o in s.options()) for s in specs)
    hi = sum(max(ilp.layer_cost(kind, s, *o, costs) for o in s.options()) for s in specs)
    return lo, hi


@pytest.mark.parametrize("kind", ["lut", "latency_ns"])
def test_estimator_budget_ilp_equals_brute_force_and_holds(tiny, kind):
    m, x, specs, sens, costs = tiny
    lo, hi = _range(specs, kind, costs)
    assert hi > lo
    for frac in (0.0, 0.15, 0.4, 0.7, 1.0):
        budget = lo + frac * (hi - lo)
        a = ilp.allocate(specs, sens, {kind: budget}, costs=costs)
        bf = ilp.brute_force(specs, sens, {kind: budget}, costs=costs)
        assert a.objective == pytest.approx(bf.objective, rel=1e-9, abs=1e-15)
        assert a.costs[kind] <= budget * (1 + 1e-9)
        # the whole-model estimate of the chosen allocation: its Dense rows are the per-layer costs
        est = estimate(whole_model_graph(m, x, a.bits), {"part": "xcvu9p", "clock_period": 5.0})
        dense = [r for r in est["layers"] if r["op"] == "Dense"]
        assert sum(r[kind] for r in dense) == pytest.approx(a.costs[kind])
        assert sum(r[kind] for r in dense) <= budget * (1 + 1e-9)


def test_lut_and_bops_budgets_together(tiny):
    _, _, specs, sens, costs = tiny
    lut_lo, lut_hi = _range(specs, "lut", costs)
    b_lo, b_hi = _range(specs, "bops", costs)
    bud = {"lut": (lut_lo + lut_hi) / 2, "bops": (b_lo + b_hi) / 2}
    a = ilp.allocate(specs, sens, bud, costs=costs)
    assert a.objective == pytest.approx(ilp.brute_force(specs, sens, bud, costs=costs).objective, rel=1e-9)
    assert a.costs["lut"] <= bud["lut"] * (1 + 1e-9) and a.costs["bops"] <= bud["bops"] * (1 + 1e-9)


def test_more_bits_never_fewer_luts(tiny):
    _, _, specs, _, costs = tiny
    for s in specs:
        for ab in (s.a_bits or (s.fixed_a_bits,)):
            luts = [costs["lut"](s, wb, ab) for wb in s.w_bits]
            assert luts == sorted(luts)


def test_dsp_budget_and_errors(tiny):
    m, x, specs, sens, _ = tiny
    # 10-bit weights times 10-bit activations reach the 9-bit DSP threshold on both operands
    # (estimate.py A3, rule 'vivado'); the 6-bit model input keeps the first layer in LUTs: a DSP budget bites
    sp = layer_specs(m, x, w_bits=(4, 10), a_bits=(), input_bits=INP["bits"], fixed_act_bits=10)
    c = hw_costs.estimator_costs(m, sp, x, INP, {"dsp_rule": "vivado"}, kinds=("dsp",))
    assert all(c["dsp"](s, 4, s.fixed_a_bits) == 0 for s in sp)
    assert c["dsp"](sp[0], 10, sp[0].fixed_a_bits) == 0  # 6-bit data: LUTs whatever the weights
    on_dsp = {s.name for s in sp if c["dsp"](s, 10, s.fixed_a_bits) > 0}
    assert on_dsp
    sens2 = {s.name: {o: 1.0 / o[0] for o in s.options()} for s in sp}
    a = ilp.allocate(sp, sens2, {"dsp": 0}, costs=c)
    assert a.costs["dsp"] == 0 and all(a.bits[n][0] == 4 for n in on_dsp)
    with pytest.raises(QDeployError, match="unknown estimator cost"):
        hw_costs.estimator_costs(m, sp, x, INP, kinds=("watts",))
    bad = hw_costs.estimator_costs(m, sp, x, INP, {"part": "nope"}, kinds=("lut",))
    with pytest.raises(QDeployError, match="unknown FPGA part"):
        bad["lut"](sp[0], 4, sp[0].fixed_a_bits)
    assert parse_budget("lut=5e4,latency_ns=uniform:3.5") == {"lut": 5e4, "latency_ns": "uniform:3.5"}
