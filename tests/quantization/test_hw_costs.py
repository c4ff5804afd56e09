"""FPGA budgets: per-layer LUT/DSP/latency costs from the hls4ml
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
from qdeploy.compiler.quantization.hessian import layer_inputs
from qdeploy.compiler.quantization.hutchinson import hutchinson_traces
from qdeploy.compiler.quantization.search import compute_sensitivities, layer_specs
from qdeploy.compiler.quantization.search_budget import parse_search_budget

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
            # QuantReLU as the QONNX frontend imports it: round half even, saturating
            h = b.add(f"q{i}", "Quantize", [h], attrs={"to": FixedType(ab, ab - f, False, "RND_CONV", "SAT")})
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
    return ilp.cost_range(kind, specs, costs)


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
        # the whole-model estimate of the chosen allocation: its Dense rows are the unary costs, the
        # Relu/Quantize rows between two layers the pair costs; the total is the ILP's cost
        est = estimate(whole_model_graph(m, x, a.bits), {"part": "xcvu9p", "clock_period": 5.0})
        dense = [r for r in est["layers"] if r["op"] == "Dense"]
        assert sum(r[kind] for r in dense) == pytest.approx(sum(ilp.layer_cost(kind, s, *a.bits[s.name], costs)
                                                                for s in specs))
        assert est["total"][kind] == pytest.approx(a.costs[kind])
        assert est["total"][kind] <= budget * (1 + 1e-9)


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
    assert parse_search_budget("lut=5e4,latency_ns=uniform:3.5") == {"lut": 5e4, "latency_ns": "uniform:3.5"}


@pytest.fixture(scope="module")
def cnn():
    """Digits-CNN-like Conv(1->4)-ReLU-MaxPool-Conv(4->8)-ReLU-MaxPool-Flatten-Linear on sklearn's 8x8
    digit images (a few epochs), pixels k/16 as a 5-bit input."""
    from sklearn.datasets import load_digits

    from qdeploy.compiler.quantization import qat

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, padding=1),
                      nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32, 10))
    qat.fine_tune(m, x[:600], d.target[:600], epochs=3, lr=1e-2, seed=0)
    xc = x[:256]
    inp = {"bits": 5, "scale": 2.0 ** -4, "signed": False}
    specs = layer_specs(m, xc[:1], w_bits=(2, 3, 4, 8), a_bits=(2, 3, 4, 8), input_bits=inp["bits"])
    costs = hw_costs.estimator_costs(m, specs, xc, inp, {"part": "xcvu9p", "clock_period": 5.0})
    return m, xc, inp, specs, costs


@pytest.mark.parametrize("bits", [((4, 5), (3, 4), (4, 3)), ((8, 5), (8, 8), (8, 8)), ((2, 5), (4, 2), (2, 3))])
def test_cnn_search_lut_matches_exported_estimate(cnn, tmp_path, bits):
    """Search-side LUTs (unary + pair) vs ``estimate`` of the exported QONNX model (zero QAT epochs):
    within 15% (exact here); the Dense/Conv rows alone (the cost before pair costs) were > 1.5x off."""
    from qdeploy.compiler.frontends import load_model
    from qdeploy.compiler.quantization import qat

    m, xc, inp, specs, costs = cnn
    alloc = {s.name: b for s, b in zip(specs, bits)}
    q = qat.build_qat_model(m, alloc, input_bits=inp["bits"], input_scale=inp["scale"],
                            input_signed=inp["signed"], calibration_x=xc)
    g = load_model(str(qat.export_qonnx(q, xc[:1], tmp_path / "cnn.onnx")))
    est = estimate(g, {"part": "xcvu9p", "clock_period": 5.0})
    ref = est["total"]["lut"]
    unary = sum(ilp.layer_cost("lut", s, *alloc[s.name], costs) for s in specs)
    total = ilp.total_cost("lut", specs, alloc, costs)
    assert ref / unary > 1.5  # ReLU / Quantize / MaxPool rows left out
    assert abs(total / ref - 1) < 0.15
    # per kind, the pair costs are the rows between the weight layers
    mac = sum(r["lut"] for r in est["layers"] if r["op"] in ("Dense", "Conv"))
    assert mac == pytest.approx(unary, rel=0.05)
    assert ilp.total_cost("latency_cycles", specs, alloc, costs) == pytest.approx(est["total"]["latency_cycles"])


def test_chain_graph_errors_name_the_module():
    from qdeploy.compiler.ir import FixedType

    with pytest.raises(QDeployError, match="Sigmoid between weight layers"):
        hw_costs.chain_graph([nn.ReLU(), nn.Sigmoid()], (8,), FixedType(12, 6, True), 4, [2], "a->b")
    g = hw_costs.chain_graph([nn.ReLU(), nn.Dropout(), nn.Flatten()], (2, 2, 3), FixedType(12, 6, True), 4, [2])
    assert [n.op for n in g.nodes] == ["Relu", "Quantize", "Reshape"]
    assert g.value(g.outputs[0]).shape == (12,) and g.value(g.outputs[0]).dtype.width == 4
