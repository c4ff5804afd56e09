"""The batch-A conformance cases (:data:`.cases_batch_a.CASES_A`) on every backend, hls4ml in both
io_parallel and io_stream: reference == TVM == hls4ml C simulation, code for code; a case a backend
rejects must be listed in ``Case.rejects`` and refused with an ``UnsupportedError`` naming one of
its nodes."""
from __future__ import annotations

import numpy as np
import pytest

from qdeploy.compiler import reference as ref
from qdeploy.compiler.errors import UnsupportedError

from .cases_batch_a import CASES_A
from .conftest import Wide, backend_params, compare, random_feeds

CONFIGS = {"reference": None, "tvm-llvm": None, "hls4ml": {"hls4ml": {"io_type": "io_parallel"}},
           "hls4ml-stream": {"hls4ml": {"io_type": "io_stream"}}}
#: cases hls4ml's io_stream refuses on top of ``Case.rejects``
STREAM_REJECTS = {"avgpool_padded"}


@pytest.fixture(scope="module")
def wides(compiled):
    return {k: Wide(f"opsA_{k}".replace("-", "_"), CASES_A, compiled, seed=11, config=cfg)
            for k, cfg in CONFIGS.items()}


@pytest.fixture(scope="module")
def runs():
    return {}


def _params():
    out = []
    for p in backend_params():
        out.append(p)
        if p.values[0] == "hls4ml":
            out.append(pytest.param("hls4ml-stream", id="hls4ml-stream", marks=p.marks))
    return out


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("target", _params())
def test_batch_a_exact(target, wides, runs):
    backend = target.replace("-stream", "")
    rejected, comp, outs = wides[target].get(backend)
    feeds = random_feeds(comp.graph, np.random.default_rng(5), 8)
    got, want = comp(feeds), ref.execute(comp.graph, feeds, codes=True)
    expect_rej = {c.id for c in CASES_A if backend in c.rejects and backend != "reference"}
    if target == "hls4ml-stream":
        expect_rej |= STREAM_REJECTS
    assert set(rejected) == expect_rej, {k: str(v) for k, v in rejected.items()}
    for cid, err in rejected.items():
        assert isinstance(err, UnsupportedError) and err.node and err.node.startswith(f"{cid}__"), err
    bad = []
    for cid, o in outs.items():
        bad += compare("opsA", cid, target, comp.graph, got, want, outputs=o)
    assert not bad, "\n".join(bad)


def _directed_rounding_model():
    """x -> Quant CEIL (float input, host prologue on hls4ml) -> 1x1 Conv -> Quant UP (signed) and
    Quant CEIL (unsigned), concatenated: the exact CEIL/UP compositions on every target."""
    from onnx import helper

    from tests.compiler.test_import_batch_a import f32, mk, quant

    q0, i0 = quant("q0", "x", "a", 2.0 ** -3, 6, mode="CEIL")
    qw, iw = quant("qw", "wf", "w", 2.0 ** -3, 5)
    conv = helper.make_node("Conv", ["a", "w"], ["c"], name="conv", kernel_shape=[1, 1])
    qu, iu = quant("qu", "c", "u", 2.0 ** -1, 5, mode="UP")
    qc, ic = quant("qc", "c", "v", 2.0 ** -1, 4, signed=0, mode="CEIL")
    cat = helper.make_node("Concat", ["u", "v"], ["y"], name="cat", axis=1)
    w = f32(np.array([[0.75, -0.5, 0.25], [-1.0, 0.5, 0.125]]).reshape(2, 3, 1, 1))
    return mk([q0, qw, conv, qu, qc, cat], [16, 3, 4, 4], {**i0, **iw, **iu, **ic, "wf": w})


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("target", _params())
def test_ceil_and_up_rounding_on_every_target(target, compiled):
    """QONNX Quant CEIL / UP (no ap_fixed mode) imported as exact compositions: the reference equals
    qonnx's executor, and every target equals the reference code for code."""
    from qdeploy.compiler.frontends import import_onnx
    from tests.compiler.test_import_batch_a import grid, run_ir, run_qonnx

    m = _directed_rounding_model()
    x = grid(np.random.default_rng(3), (16, 3, 4, 4), -900, 900, 6)
    g = import_onnx(m)
    np.testing.assert_array_equal(run_ir(g, {"x": x}), run_qonnx(m, {"x": x}))
    backend = target.replace("-stream", "")
    comp = compiled.get(backend, g, CONFIGS[target])
    feeds = {g.inputs[0]: np.transpose(x, g.meta["input_perms"][g.inputs[0]])}
    bad = compare("opsA", "ceil_up_rounding", target, g, comp(feeds), ref.execute(g, feeds, codes=True))
    assert not bad, "\n".join(bad)


def _trunc_pool_model():
    """Quant -> AveragePool 2x2/2 with count_include_pad=1 pads -> Trunc v2 (ROUND) -> ReduceMean over
    H, W -> Trunc v2 (FLOOR): the imported Pad / AvgPool / GlobalAvgPool / Quantize chain on every
    target (qonnx domain opset 2, as Brevitas exports)."""
    from onnx import helper

    from tests.compiler.test_import_batch_a import QD, f32, mk, quant

    q0, i0 = quant("q0", "x", "a", 2.0 ** -3, 6)
    ap = helper.make_node("AveragePool", ["a"], ["b"], name="ap", kernel_shape=[2, 2], strides=[2, 2],
                          pads=[1, 1, 1, 1], count_include_pad=1)
    t1 = helper.make_node("Trunc", ["b", "s1", "z", "bw8", "s0", "bw6"], ["c"], name="t1", domain=QD,
                          rounding_mode="ROUND", signed=1, narrow=0)
    rm = helper.make_node("ReduceMean", ["c"], ["d"], name="rm", axes=[2, 3], keepdims=1)
    t2 = helper.make_node("Trunc", ["d", "s2", "z", "bw8", "s0", "bw6"], ["y"], name="t2", domain=QD,
                          rounding_mode="FLOOR", signed=1, narrow=1)
    m = mk([q0, ap, t1, rm, t2], [16, 3, 6, 6],
           {**i0, "s0": f32(2.0 ** -3), "s1": f32(2.0 ** -5), "s2": f32(2.0 ** -7), "z": f32(0.0),
            "bw8": f32(8.0), "bw6": f32(6.0)})
    m.opset_import[1].version = 2
    return m


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("target", _params())
def test_trunc_avg_pool_chain_on_every_target(target, compiled):
    """Padded AveragePool + Trunc + ReduceMean + Trunc: the reference equals qonnx's executor, and
    every target equals the reference code for code."""
    from qdeploy.compiler.frontends import import_onnx
    from tests.compiler.test_import_batch_a import grid, run_ir, run_qonnx

    m = _trunc_pool_model()
    x = grid(np.random.default_rng(4), (16, 3, 6, 6), -300, 300, 5)
    g = import_onnx(m)
    np.testing.assert_array_equal(run_ir(g, {"x": x}), run_qonnx(m, {"x": x}))
    backend = target.replace("-stream", "")
    comp = compiled.get(backend, g, CONFIGS[target])
    feeds = {g.inputs[0]: np.transpose(x, g.meta["input_perms"][g.inputs[0]])}
    bad = compare("opsA", "trunc_pool_chain", target, g, comp(feeds), ref.execute(g, feeds, codes=True))
    assert not bad, "\n".join(bad)


def _user_model():
    """A small 'user' QONNX model using every batch-A import at once: Quant -> Pad (value 0.5) ->
    dilated Conv -> Quant UP / Quant CEIL -> Clip -> Max -> Sub -> Quant."""
    from onnx import helper

    from tests.compiler.test_import_batch_a import f32, mk, quant

    q0, i0 = quant("q0", "x", "a", 2.0 ** -4, 8)
    pad = helper.make_node("Pad", ["a", "pads", "pv"], ["p"], name="pad", mode="constant")
    qw, iw = quant("qw", "wf", "w", 2.0 ** -2, 4)
    conv = helper.make_node("Conv", ["p", "w"], ["c"], name="dconv", kernel_shape=[3, 3], dilations=[2, 2])
    qu, iu = quant("qu", "c", "u", 2.0 ** -2, 6, mode="UP")
    qc, ic = quant("qc", "c", "v", 2.0 ** -2, 6, mode="CEIL")
    clip = helper.make_node("Clip", ["u", "lo", "hi"], ["k"], name="clip")
    mx = helper.make_node("Max", ["k", "v"], ["m"], name="max")
    sub = helper.make_node("Sub", ["m", "k"], ["s"], name="sub")
    qo, io = quant("qo", "s", "y", 2.0 ** -2, 8, mode="ROUND")
    w = f32(np.random.default_rng(9).uniform(-2, 2, size=(3, 2, 3, 3)))
    return mk([q0, pad, qw, conv, qu, qc, clip, mx, sub, qo], [1, 2, 8, 8],
              {**i0, **iw, **iu, **ic, **io, "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pv": f32(0.5),
               "wf": w, "lo": f32(-2.0), "hi": f32(3.5)})


@pytest.mark.parametrize("target", backend_params(("tvm-llvm", "hls4ml")))
def test_user_model_with_batch_a_ops_compiles_bit_exact(target, tmp_path):
    """``qdeploy.compile`` (default pipeline, golden check, source-fidelity check against qonnx's
    executor) of a model using every batch-A import: bit-exact on the target and against the source."""
    import onnx

    import qdeploy

    p = tmp_path / "user.onnx"
    onnx.save(_user_model(), p)
    from tests.compiler.test_import_batch_a import grid
    x = grid(np.random.default_rng(8), (24, 2, 8, 8), -2000, 2000, 6)
    res = qdeploy.compile(str(p), target, tmp_path / "out", golden=x)
    ex = res.report["exactness"]
    assert ex["bit_exact"] and ex["samples"] == 24, ex
    fid = res.report["fidelity"]
    assert fid["checked"] and fid["ok"] and fid["mismatches"] == 0 and fid["exact_matches"] == 24, fid


def _brevitas_user_module():
    """A Brevitas CNN using batch-A ops: a dilated QuantConv2d (power-of-two weights, Int16Bias),
    nn.Hardtanh (-> Clip), TruncAvgPool2d(2) and TruncAdaptiveAvgPool2d(1) (-> AveragePool / ReduceMean
    + Trunc)."""
    import torch
    import brevitas.nn as qnn
    from brevitas.quant import Int8ActPerTensorFixedPoint, Int8WeightPerTensorFixedPoint, Int16Bias

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q0 = qnn.QuantIdentity(act_quant=Int8ActPerTensorFixedPoint, return_quant_tensor=True)
            self.conv = qnn.QuantConv2d(2, 4, 3, dilation=2, padding=2, weight_quant=Int8WeightPerTensorFixedPoint,
                                        bias_quant=Int16Bias, return_quant_tensor=False)
            self.ht = torch.nn.Hardtanh(-1.0, 1.5)
            self.q1 = qnn.QuantIdentity(act_quant=Int8ActPerTensorFixedPoint, return_quant_tensor=True)
            self.pool = qnn.TruncAvgPool2d(kernel_size=2, stride=2)
            self.gap = qnn.TruncAdaptiveAvgPool2d(output_size=1)

        def forward(self, x):
            return self.gap(self.pool(self.q1(self.ht(self.conv(self.q0(x))))))

    torch.manual_seed(1)
    return Net().eval()


@pytest.mark.parametrize("target", backend_params(("tvm-llvm", "hls4ml")))
def test_brevitas_model_with_batch_a_layers_compiles_bit_exact(target, tmp_path):
    """``qdeploy.compile`` of the Brevitas module itself (exported through QONNX): bit-exact on the
    target, and the reference equal to the Brevitas module's own output on every sample."""
    import torch

    import qdeploy
    from qdeploy.compiler import reference as refmod

    net = _brevitas_user_module()
    x = np.random.default_rng(2).normal(size=(12, 2, 8, 8)).astype(np.float32)
    with torch.no_grad():
        net(torch.from_numpy(x))  # calibrate nothing (fixed-point scales); a forward pass as a user would
    res = qdeploy.compile(net, target, tmp_path / "out", golden=x, example_input=torch.from_numpy(x[:1]))
    ex = res.report["exactness"]
    assert ex["bit_exact"] and ex["samples"] == 12, ex
    g = res.graph  # the source check for a module is done here (qdeploy's fidelity check runs ONNX sources only)
    xi = np.transpose(x, g.meta["input_perms"][g.inputs[0]])
    with torch.no_grad():
        want = net(torch.from_numpy(x))
    want = np.asarray(getattr(want, "value", want)).reshape(12, -1)
    got = np.asarray(refmod.run(g, xi)).reshape(12, -1)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("target", ["hls4ml", "asic"])
def test_estimates_price_every_batch_a_op(target, tmp_path):
    """``qdeploy.estimate`` prices a model using every batch-A op (a row per layer, positive totals);
    the hls4ml row of a dilated Conv counts the zero-inserted kernel's taps."""
    import onnx

    import qdeploy

    p = tmp_path / "user.onnx"
    onnx.save(_user_model(), p)
    est = qdeploy.estimate(str(p), target)
    names = " ".join(str(r.get("name", r.get("node", ""))) for r in est["layers"])
    for node in ("pad", "dconv", "clip", "max", "sub"):
        assert node in names, (node, names)
    assert all(v >= 0 for v in est["total"].values() if isinstance(v, (int, float)))
    if target == "hls4ml":
        row = next(r for r in est["layers"] if "dconv" in str(r.get("name", r.get("node", ""))))
        d = row["detail"]
        # C_in x 5x5 taps of the zero-inserted kernel, of which (25 - 9) x C_in x C_out products are zeros
        assert d["n_in"] == 2 * 5 * 5 and d["n_out"] == 3 and d["mults_zero"] >= (25 - 9) * 2 * 3, d


def _ceil_pool_model():
    """Quant -> MaxPool 2x2/2 ceil_mode (5x5 -> 3x3, partial windows) -> AveragePool 2x2/2 ceil_mode,
    count_include_pad=0 (3x3 -> 2x2: windows of 4, 2, 2 and 1 elements) -> Quant."""
    from onnx import helper

    from tests.compiler.test_import_batch_a import mk, quant

    q0, i0 = quant("q0", "x", "a", 2.0 ** -3, 6)
    mp = helper.make_node("MaxPool", ["a"], ["b"], name="mp", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
    ap = helper.make_node("AveragePool", ["b"], ["c"], name="ap", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
    q1, i1 = quant("q1", "c", "y", 2.0 ** -4, 8, mode="ROUND")
    return mk([q0, mp, ap, q1], [16, 3, 5, 5], {**i0, **i1})


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("target", _params())
def test_ceil_mode_pools_on_every_target(target, compiled):
    """ceil_mode pools with partial windows: the reference equals qonnx's executor and every target
    equals the reference, except hls4ml io_stream, which refuses the padded average pool naming it."""
    from qdeploy.compiler.frontends import import_onnx
    from tests.compiler.test_import_batch_a import grid, run_ir, run_qonnx

    m = _ceil_pool_model()
    x = grid(np.random.default_rng(6), (16, 3, 5, 5), -300, 300, 5)
    g = import_onnx(m)
    np.testing.assert_array_equal(run_ir(g, {"x": x}), run_qonnx(m, {"x": x}))
    backend = target.replace("-stream", "")
    if target == "hls4ml-stream":
        with pytest.raises(UnsupportedError, match="node 'ap'.*io_stream"):
            compiled.get(backend, g, CONFIGS[target])
        return
    comp = compiled.get(backend, g, CONFIGS[target])
    feeds = {g.inputs[0]: np.transpose(x, g.meta["input_perms"][g.inputs[0]])}
    bad = compare("opsA", "ceil_pools", target, g, comp(feeds), ref.execute(g, feeds, codes=True))
    assert not bad, "\n".join(bad)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("target", _params())
def test_trunc_avg_pool_of_area_9_on_every_target(target, compiled, tmp_path_factory):
    """Brevitas TruncAvgPool2d(3) -> QuantIdentity: the Trunc's non-power-of-two scale becomes a
    MultiThreshold (tests/compiler/test_import_batch_a_pool.py); the reference equals qonnx's
    executor and every target the reference."""
    from qdeploy.compiler.frontends import import_onnx
    from tests.compiler.test_import_batch_a import grid, run_ir, run_qonnx
    from tests.compiler.test_import_batch_a_pool import brevitas_trunc_pool_requant_model

    m, _ = brevitas_trunc_pool_requant_model(3, 6, tmp_path_factory.mktemp("t9") / "t9.onnx")
    name = m.graph.input[0].name
    xs = [grid(np.random.default_rng(i), (1, 3, 6, 6), -1200, 1200, 6) for i in range(8)]
    g = import_onnx(m)
    for x in xs:
        np.testing.assert_array_equal(run_ir(g, {name: x}), run_qonnx(m, {name: x}))
    backend = target.replace("-stream", "")
    comp = compiled.get(backend, g, CONFIGS[target])
    x = np.concatenate(xs)
    feeds = {g.inputs[0]: np.transpose(x, g.meta["input_perms"][g.inputs[0]])}
    bad = compare("opsA", "trunc_avg9", target, g, comp(feeds), ref.execute(g, feeds, codes=True))
    assert not bad, "\n".join(bad)
