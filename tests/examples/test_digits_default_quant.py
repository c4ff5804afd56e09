"""The done-when test of scaled-integer import: Brevitas models with *default* quantizers compile exactly.

QuantLinear/QuantConv2d defaults (``Int8WeightPerTensorFloat``, or ``Int8WeightPerChannelFloat``), QuantReLU
(``Uint8ActPerTensorFloat``) and QuantIdentity (``Int8ActPerTensorFloat``) have float scales, so the
models go through the scaled-integer path (MultiThreshold requantizers, integer Dense/Conv).  Trained
a few epochs on scikit-learn digits (examples/digits/models.py's data and split), compiled with
``qdeploy.api.compile`` and run on the 450 test images:

* every requantizer after a layer: our integer codes equal a float64 evaluation of the real-number
  semantics (Brevitas's layer input codes x scale, weight codes x scales, float bias, in float64:
  the oracle) on every image whose earlier requantizers agree with Brevitas (so the layer input is
  the same), and equal Brevitas's own float32 codes there except where Brevitas's float32 sum lies
  within float32 rounding of a rounding tie (counted, at most 5: each such element's float64 value
  is within 1e-3 code of a .5 boundary; its image is then left out of the later comparisons);
* outputs: a final QuantIdentity output is compared bit for bit, float logits (a float-bias last
  Linear) to float32 rounding; the argmax differs at most on the images with a tie.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dm():
    spec = importlib.util.spec_from_file_location("digits_models_default", REPO / "examples" / "digits" / "models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _mlp(weight_quant, out_quant):
    import torch
    from brevitas.nn import QuantIdentity, QuantLinear, QuantReLU
    from torch import nn
    torch.manual_seed(0)
    kw = {} if weight_quant is None else {"weight_quant": weight_quant}
    layers = [QuantIdentity(return_quant_tensor=True), QuantLinear(64, 32, bias=True, **kw),
              QuantReLU(return_quant_tensor=True), QuantLinear(32, 32, bias=True, **kw),
              QuantReLU(return_quant_tensor=True), QuantLinear(32, 10, bias=True, **kw)]
    if out_quant:
        layers.append(QuantIdentity(return_quant_tensor=True))
    return nn.Sequential(*layers)


def _cnn(weight_quant, out_quant):
    import torch
    from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear, QuantReLU
    from torch import nn
    torch.manual_seed(0)
    kw = {} if weight_quant is None else {"weight_quant": weight_quant}
    return nn.Sequential(
        QuantIdentity(return_quant_tensor=True), QuantConv2d(1, 8, 3, padding=1, **kw),
        QuantReLU(return_quant_tensor=True), nn.MaxPool2d(2), QuantConv2d(8, 16, 3, padding=1, **kw),
        QuantReLU(return_quant_tensor=True), nn.MaxPool2d(2), nn.Flatten(), QuantLinear(64, 10, bias=True, **kw))


def _cnn_zero_points(weight_quant, out_quant):
    """ShiftedUint8ActPerTensorFloat (a learned zero point) on the input, between two padded convs
    (the padding holds the code of the real 0) and on the output."""
    import torch
    from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear, QuantReLU
    from brevitas.quant import Int8WeightPerChannelFloat, ShiftedUint8ActPerTensorFloat
    from torch import nn
    torch.manual_seed(0)
    return nn.Sequential(
        QuantIdentity(act_quant=ShiftedUint8ActPerTensorFloat, return_quant_tensor=True),
        QuantConv2d(1, 8, 3, padding=1, weight_quant=Int8WeightPerChannelFloat),
        QuantIdentity(act_quant=ShiftedUint8ActPerTensorFloat, return_quant_tensor=True),
        QuantConv2d(8, 8, 3, padding=1), QuantReLU(return_quant_tensor=True), nn.Flatten(),
        QuantLinear(512, 10, bias=True), QuantIdentity(act_quant=ShiftedUint8ActPerTensorFloat, return_quant_tensor=True))


def _oracle_codes(layer, inp, act_mod, act_out):
    """float64 codes of activation quantizer ``act_mod`` (QuantReLU or QuantIdentity; output QuantTensor
    ``act_out``) after ``layer`` (QuantLinear/QuantConv2d) on the QuantTensor ``inp``: (codes, f) with
    f the float64 value round() (half to even) is applied to."""
    import torch
    import torch.nn.functional as F
    from brevitas.nn import QuantReLU
    with torch.no_grad():
        x = (inp.int().double() - inp.zero_point.double()) * inp.scale.double()
        wq = layer.quant_weight()
        w = (wq.int().double() - wq.zero_point.double()) * wq.scale.double()
        b = layer.bias.double() if layer.bias is not None else None
        if isinstance(layer, torch.nn.Conv2d):
            pre = F.conv2d(x, w, b, layer.stride, layer.padding)
        else:
            pre = F.linear(x, w, b)
        f = (torch.relu(pre) if isinstance(act_mod, QuantReLU) else pre) / act_out.scale.double() \
            + act_out.zero_point.double()
        bits, signed = int(act_out.bit_width), bool(act_out.signed)
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        codes = torch.clamp(torch.round(f), lo, hi)
    return codes.numpy().astype(np.int64), f.numpy()


CASES = [("mlp", _mlp, None, True), ("mlp_logits", _mlp, None, False), ("cnn", _cnn, None, False),
         ("mlp_per_channel", _mlp, "Int8WeightPerChannelFloat", False),
         ("cnn_per_channel", _cnn, "Int8WeightPerChannelFloat", False), ("cnn_zero_points", _cnn_zero_points, None, True)]


_TRAINED: dict = {}


def _trained(dm, name):
    """(model trained 3 epochs in eval mode, x_test [450, ...]) of case ``name``, trained once."""
    if name not in _TRAINED:
        import brevitas.quant
        _, make, wq, out_quant = next(c for c in CASES if c[0] == name)
        x_tr, y_tr, x_te, _ = dm.load_data(seed=0, images=name.startswith("cnn"))
        model = make(getattr(brevitas.quant, wq) if wq else None, out_quant)
        dm.train(model, (x_tr, y_tr), epochs=3, seed=0, verbose=False)
        _TRAINED[name] = (model.eval(), x_te)
    return _TRAINED[name]


@pytest.mark.parametrize("name,make,wq,out_quant", CASES, ids=[c[0] for c in CASES])
def test_default_quantizers_exact(dm, tmp_path, name, make, wq, out_quant):
    import torch
    from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear, QuantReLU
    from qdeploy import api
    from qdeploy.compiler import reference

    model, x_te = _trained(dm, name)
    assert len(x_te) == 450
    res = api.compile(model, target="reference", out_dir=tmp_path / "out", golden=x_te[:64],
                      example_input=torch.from_numpy(x_te[:1]))
    g = res.graph
    fid = res.report["fidelity"]  # qdeploy's own source check (the module run on the golden images)
    assert fid["checked"] and fid["ok"], fid
    g0 = api.load(model, torch.from_numpy(x_te[:1]))  # the imported graph, before the pipeline
    assert "MultiThreshold" in [n.op for n in g0.nodes]  # the scaled-integer path was taken

    # Brevitas forward with hooks: each layer's QuantTensor input and each QuantReLU's output
    seq = list(model)
    caps = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, k=k: caps.__setitem__(k, (i[0], o))) for k, m in enumerate(seq)]
    with torch.no_grad():
        out = model(torch.from_numpy(x_te))
    for h in hooks:
        h.remove()
    want = getattr(out, "value", out).numpy()

    (perm,) = g.meta["input_perms"].values()
    out = reference.execute(g, {g.inputs[0]: np.transpose(x_te, perm)})  # the compiled graph (requant_shift)
    got = np.transpose(out[g.outputs[0]], g.meta["output_perms"][g.outputs[0]])
    env = reference.execute(g0, {g0.inputs[0]: np.transpose(x_te, perm)}, keep=True)  # the imported graph
    np.testing.assert_array_equal(np.transpose(env[g0.outputs[0]], g0.meta["output_perms"][g0.outputs[0]]), got)
    prod = {n.output: n for n in g0.nodes}
    mts = [n for n in g0.nodes if n.op == "MultiThreshold" and prod[n.inputs[0]].op in ("Dense", "Conv")]
    acts = [k for k, m in enumerate(seq) if isinstance(m, (QuantReLU, QuantIdentity)) and k > 0
            and isinstance(seq[k - 1], (QuantLinear, QuantConv2d))]  # each requantizer after a layer
    assert len(mts) == len(acts)
    ties = 0
    tainted = np.zeros(len(x_te), dtype=bool)  # images where an earlier requantizer differs from Brevitas
    for n, k in zip(mts, acts):
        layer = seq[k - 1]
        inp, act = caps[k - 1][0], caps[k][1]
        oracle, f = _oracle_codes(layer, inp, seq[k], act)  # from Brevitas's own layer input
        brev = act.int().numpy().astype(np.int64)
        ours = env[n.output]
        if brev.ndim == 4:
            oracle, f, brev = (a.transpose(0, 2, 3, 1) for a in (oracle, f, brev))
        ok = ~tainted  # the same layer input as Brevitas: exactly the real-number semantics
        np.testing.assert_array_equal(ours[ok], oracle[ok])
        diff = (ours != brev) & ok.reshape((-1,) + (1,) * (ours.ndim - 1))
        frac = np.abs(f[diff] - np.floor(f[diff]) - 0.5)
        assert np.all(frac < 1e-3), frac  # Brevitas differs only at float32 near-ties
        ties += int(diff.sum())
        tainted |= diff.reshape(len(diff), -1).any(axis=1)
    assert ties <= 5, ties
    assert int((got.argmax(1) != want.argmax(1)).sum()) <= int(tainted.sum())  # only a tie may move a class
    if out_quant:
        np.testing.assert_array_equal(got[~tainted], want[~tainted])  # a quantized output: bit for bit
    else:
        np.testing.assert_allclose(got[~tainted], want[~tainted], rtol=0,
                                   atol=1e-5 * max(1.0, float(np.abs(want).max())))
        assert any("float32" in t for t in res.report["notes"])


_FAST = {("mlp", "hls4ml"), ("cnn_zero_points", "tvm-llvm"), ("cnn_per_channel", "tvm-llvm")}
TARGETS = [pytest.param(n, t, id=f"{n}-{t}", marks=() if (n, t) in _FAST else pytest.mark.slow)
           for n, t in (("mlp", "tvm-llvm"), ("mlp_logits", "tvm-llvm"), ("cnn", "tvm-llvm"),
                        ("mlp_per_channel", "tvm-llvm"), ("cnn_per_channel", "tvm-llvm"), ("cnn_zero_points", "tvm-llvm"),
                        ("mlp", "hls4ml"), ("cnn_per_channel", "hls4ml"), ("cnn_zero_points", "hls4ml"))]


@pytest.mark.parametrize("name,target", TARGETS)
def test_default_quantizers_on_targets(dm, tmp_path, name, target):
    """The same models built for TVM (llvm) and the hls4ml C simulation: the built artifact's outputs
    on all 450 test images equal the reference interpreter's bit for bit (and, through the test
    above, the real-number semantics)."""
    import torch
    from qdeploy import api
    from qdeploy.compiler import reference

    model, x_te = _trained(dm, name)
    res = api.compile(model, target=target, out_dir=tmp_path / "out", golden=x_te[:64],
                      example_input=torch.from_numpy(x_te[:1]))
    assert res.report["exactness"]["bit_exact"] and res.report["fidelity"]["ok"]
    g = res.graph
    assert any("requant_shift" in t for p in res.report["passes"] for t in p["notes"])  # requantizers were there
    got = np.asarray(res.load().predict(x_te))
    (perm,) = g.meta["input_perms"].values()
    want = np.asarray(reference.run(g, np.transpose(x_te, perm)))
    want = np.transpose(want, g.meta["output_perms"][g.outputs[0]])
    np.testing.assert_array_equal(got, want)
    with torch.no_grad():
        out = model(torch.from_numpy(x_te))
    brev = getattr(out, "value", out).numpy()
    assert np.array_equal(got.argmax(1), brev.argmax(1))  # same class as Brevitas on every image
