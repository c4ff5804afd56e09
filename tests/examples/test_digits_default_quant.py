"""The done-when test of scaled-integer import: Brevitas models with *default* quantizers compile exactly.

QuantLinear/QuantConv2d defaults (``Int8WeightPerTensorFloat``, or ``Int8WeightPerChannelFloat``), QuantReLU
(``Uint8ActPerTensorFloat``) and QuantIdentity (``Int8ActPerTensorFloat``) have float scales, so the
models go through the scaled-integer path (MultiThreshold requantizers, integer Dense/Conv).  Trained
a few epochs on scikit-learn digits (examples/digits/models.py's data and split), compiled with
``qdeploy.api.compile`` and run on the 450 test images:

* every quantized activation: our integer codes equal a float64 evaluation of the real-number
  semantics (layer input codes x scale, weight codes x scales, float bias, in float64: the oracle),
  on every element, and equal Brevitas's own float32 codes except where Brevitas's float32 sum
  lies within float32 rounding of a rounding tie (counted: each such element's float64 value is
  within 1e-3 code of a .5 boundary);
* outputs: a final QuantIdentity output is compared bit for bit; float logits (a float-bias last
  Linear) agree to float32 rounding, with the same argmax on every image.
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
        layers.append(QuantIdentity())
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


def _oracle_codes(layer, inp, act_out):
    """float64 codes of QuantReLU output ``act_out`` after ``layer`` (QuantLinear/QuantConv2d) on the
    QuantTensor ``inp``: (codes, f) with f the float64 value round() is applied to."""
    import torch
    import torch.nn.functional as F
    torch.set_grad_enabled(False)
    x = (inp.int().double() - inp.zero_point.double()) * inp.scale.double()
    wq = layer.quant_weight()
    w = (wq.int().double() - wq.zero_point.double()) * wq.scale.double()
    b = layer.bias.double() if layer.bias is not None else None
    if isinstance(layer, torch.nn.Conv2d):
        pre = F.conv2d(x, w, b, layer.stride, layer.padding)
    else:
        pre = F.linear(x, w, b)
    f = torch.relu(pre) / act_out.scale.double() + act_out.zero_point.double()
    codes = torch.clamp(torch.round(f), 0, 255)  # Uint8ActPerTensorFloat: 8-bit unsigned, round half to even
    torch.set_grad_enabled(True)
    return codes.numpy().astype(np.int64), f.numpy()


CASES = [("mlp", _mlp, None, True), ("mlp_logits", _mlp, None, False), ("cnn", _cnn, None, False),
         ("mlp_per_channel", _mlp, "Int8WeightPerChannelFloat", False),
         ("cnn_per_channel", _cnn, "Int8WeightPerChannelFloat", False)]


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
    from brevitas.nn import QuantConv2d, QuantLinear, QuantReLU
    from qdeploy import api
    from qdeploy.compiler import reference

    model, x_te = _trained(dm, name)
    assert len(x_te) == 450
    res = api.compile(model, target="reference", out_dir=tmp_path / "out", golden=x_te[:64],
                      example_input=torch.from_numpy(x_te[:1]))
    g = res.graph
    fid = res.report["fidelity"]  # qdeploy's own source check (the module run on the golden images)
    assert fid["checked"] and fid["ok"], fid
    # the scaled-integer path was taken: MultiThreshold requantizers, most of them rewritten by the
    # requant_shift pass into their proved multiply-and-shift form (Affine -> Quantize, same node name)
    shifted = [t for p in res.report["passes"] if p["name"] == "requant_shift" for t in p["notes"]]
    assert "MultiThreshold" in [n.op for n in g.nodes] or any("became multiply-and-shift" in t for t in shifted)

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
    env = reference.execute(g, {g.inputs[0]: np.transpose(x_te, perm)}, keep=True)
    got = np.transpose(env[g.outputs[0]], g.meta["output_perms"][g.outputs[0]])
    prod = {n.output: n for n in g.nodes}

    def requantizer(n) -> bool:
        """A MultiThreshold after a Dense/Conv, or its requant_shift form (Affine '<name>_mul' -> Quantize)."""
        if n.op == "MultiThreshold":
            return prod[n.inputs[0]].op in ("Dense", "Conv")
        a = prod.get(n.inputs[0]) if n.op == "Quantize" else None
        return (a is not None and a.op == "Affine" and a.name.startswith(f"{n.name}_mul")
                and prod[a.inputs[0]].op in ("Dense", "Conv"))

    mts = [n for n in g.nodes if requantizer(n)]
    relus = [k for k, m in enumerate(seq) if isinstance(m, QuantReLU)]
    assert len(mts) == len(relus) + out_quant
    ties = 0
    for n, k in zip(mts, relus):
        layer = seq[k - 1]
        assert isinstance(layer, (QuantLinear, QuantConv2d))
        inp, act = caps[k - 1][0], caps[k][1]
        oracle, f = _oracle_codes(layer, inp, act)
        brev = act.int().numpy().astype(np.int64)
        ours = env[n.output]
        if brev.ndim == 4:
            oracle, f, brev = (a.transpose(0, 2, 3, 1) for a in (oracle, f, brev))
        np.testing.assert_array_equal(ours, oracle)  # exact: the real-number semantics
        diff = ours != brev
        frac = np.abs(f[diff] - np.floor(f[diff]) - 0.5)
        assert np.all(frac < 1e-3), frac  # Brevitas differs only at float32 near-ties
        ties += int(diff.sum())
    assert ties <= 5, ties
    assert np.array_equal(got.argmax(1), want.argmax(1))
    if out_quant:
        np.testing.assert_array_equal(got, want)  # a quantized output: bit for bit
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, float(np.abs(want).max())))
        assert any("float32" in t for t in res.report["notes"])


TARGETS = [("mlp", "tvm-llvm"), ("mlp_logits", "tvm-llvm"), ("cnn", "tvm-llvm"), ("mlp_per_channel", "tvm-llvm"),
           ("cnn_per_channel", "tvm-llvm"), ("mlp", "hls4ml"), ("cnn_per_channel", "hls4ml")]


@pytest.mark.parametrize("name,target", TARGETS, ids=[f"{n}-{t}" for n, t in TARGETS])
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
    assert "MultiThreshold" in [n.op for n in g.nodes] or any(
        "requant_shift" in t for p in res.report["passes"] for t in p["notes"])
    got = np.asarray(res.load().predict(x_te))
    (perm,) = g.meta["input_perms"].values()
    want = np.asarray(reference.run(g, np.transpose(x_te, perm)))
    want = np.transpose(want, g.meta["output_perms"][g.outputs[0]])
    np.testing.assert_array_equal(got, want)
    with torch.no_grad():
        out = model(torch.from_numpy(x_te))
    brev = getattr(out, "value", out).numpy()
    assert np.array_equal(got.argmax(1), brev.argmax(1))  # same class as Brevitas on every image
