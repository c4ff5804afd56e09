"""Measured sensitivities (the check on the second-order model) and calibrated QAT activation scales."""
import numpy as np
import pytest
import torch
from torch import nn

import qdeploy
from qdeploy.compiler.errors import QDeployError
from qdeploy.compiler.quantization import qat, sensitivity
from qdeploy.compiler.quantization.hutchinson import hutchinson_traces
from qdeploy.compiler.quantization.search import compute_sensitivities, layer_specs


@pytest.fixture(scope="module")
def digits_mlp():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (np.round(d.data) / 16.0).astype(np.float32)[:400]
    y = d.target.astype(np.int64)[:400]
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 10))
    qat.fine_tune(m, x, y, epochs=15, lr=1e-2)
    return m, x, y


def test_measured_loss_increase_restores_model_and_tracks_bits(digits_mlp):
    m, x, y = digits_mlp
    before = {k: v.clone() for k, v in m.state_dict().items()}
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    dw = sensitivity.measured_loss_increase(m, xt, yt, "2", [2, 4, 8])
    da = sensitivity.measured_loss_increase(m, xt, yt, "2", [2, 8], what="act")
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights put back exactly
    # ternary weights hurt far more than 8-bit ones; 8 bits is at noise level
    assert dw[2] > 10 * abs(dw[8]) and dw[2] > dw[4]
    assert abs(dw[8]) < 1e-2 and abs(da[8]) < 1e-2 and da[2] > abs(da[8])
    # the same number computed by hand for one width
    w0 = m[2].weight.detach().clone()
    with torch.no_grad():
        base = float(nn.functional.cross_entropy(m(xt), yt))
        m[2].weight.copy_(sensitivity.quantize_weight_pot(w0, 4))
        by_hand = float(nn.functional.cross_entropy(m(xt), yt)) - base
        m[2].weight.copy_(w0)
    assert dw[4] == pytest.approx(by_hand, rel=1e-6, abs=1e-9)
    with pytest.raises(QDeployError, match="weight' or 'act'"):
        sensitivity.measured_loss_increase(m, xt, yt, "2", [4], what="bias")


def test_hessian_plus_measured_is_the_max_of_both(digits_mlp):
    m, x, y = digits_mlp
    specs = layer_specs(m, x[:1], w_bits=[2, 3, 4, 8], a_bits=[2, 4, 8], input_bits=5)
    tr = hutchinson_traces(m, (x, y), activations=[s.name for s in specs if s.a_bits], method="auto")
    det = {}
    h = compute_sensitivities(m, specs, tr, x, y, mode="hessian")
    hm = compute_sensitivities(m, specs, tr, x, y, mode="hessian+measured", details=det)
    me = compute_sensitivities(m, specs, tr, x, y, mode="measured")
    raised = 0
    for s in specs:
        d = det[s.name]
        for (wb, ab), v in hm[s.name].items():
            assert v >= h[s.name][(wb, ab)] - 1e-12 and v >= me[s.name][(wb, ab)] - 1e-12
            ow = max(d["omega_w"][wb], 2 * d["measured_w"][wb])
            oa = max(d["omega_a"][ab], 2 * d["measured_a"][ab]) if s.a_bits else 0.0
            assert v == pytest.approx(ow + oa)
        raised += sum(2 * d["measured_w"][b] > d["omega_w"][b] for b in s.w_bits)
    # the quadratic model under-estimates somewhere on a trained net (2-bit weights)
    assert raised >= 1
    with pytest.raises(QDeployError, match="sensitivity mode"):
        compute_sensitivities(m, specs, tr, x, y, mode="second-order")
    with pytest.raises(QDeployError, match="needs the labels"):
        compute_sensitivities(m, specs, tr, x, None, mode="measured")


def test_measured_sensitivity_ignores_dropout_and_batchnorm_mode(digits_mlp):
    m, x, y = digits_mlp
    torch.manual_seed(1)
    mb = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 10))
    qat.fine_tune(mb, x, y, epochs=3, lr=1e-2)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    mb.eval()
    a = sensitivity.measured_loss_increase(mb, xt, yt, "0", [2, 3])
    stats = mb[1].running_mean.clone()
    mb.train()
    b = sensitivity.measured_loss_increase(mb, xt, yt, "0", [2, 3])
    assert a == b and mb.training  # eval inside, mode restored
    assert torch.equal(mb[1].running_mean, stats)  # batch-norm statistics did not move


def test_calibrated_activation_scale_starts_at_least_squares_pot(digits_mlp):
    m, x, y = digits_mlp
    bits = {"0": (4, 8), "2": (3, 2), "4": (3, 3)}
    q = qat.build_qat_model(m, bits, input_bits=5, input_scale=2.0 ** -4, calibration_x=x)
    relu = {}
    hooks = [m[i].register_forward_hook(lambda mod, a, o, i=i: relu.__setitem__(str(i), o.detach())) for i in (1, 3)]
    m(torch.as_tensor(x))
    for hk in hooks:
        hk.remove()
    for name, consumer in (("1", "2"), ("3", "4")):
        ab = bits[consumer][1]
        want = sensitivity.quantize_act_pot(relu[name], ab, signed=False)[1]
        got = float(q._modules[name].act_quant.scale())
        assert got == want and np.frexp(got)[0] == 0.5  # a power of two
        assert q._modules[name].act_quant.bit_width() == ab


def test_calibrated_low_bit_qat_model_compiles_bit_exact(digits_mlp, tmp_path):
    m, x, y = digits_mlp
    bits = {"0": (3, 8), "2": (2, 2), "4": (4, 3)}
    q = qat.build_qat_model(m, bits, input_bits=5, input_scale=2.0 ** -4, calibration_x=x)
    qat.fine_tune(q, x, y, epochs=2, lr=5e-3)
    p = qat.export_qonnx(q, x[:1], tmp_path / "q.onnx")
    res = qdeploy.compile(str(p), target="reference", out_dir=tmp_path / "c")
    assert res.report["exactness"]["bit_exact"]
    got = np.asarray(qdeploy.run(tmp_path / "c", x[:200]))
    want = qat.predict(q, x[:200])
    # the artifact's fixed-point outputs are the Brevitas model's outputs (same grid, same values)
    assert np.array_equal(got.argmax(1), want.argmax(1))
    assert np.max(np.abs(got - want)) < 1e-5


def test_accuracy_noise_is_paired_over_samples():
    from qdeploy.compiler.quantization.search_report import accuracy_noise, comparison_verdict
    a = {"test_acc": 0.75, "test_accs": [0.75], "test_correct": [1, 1, 1, 0]}
    b = {"test_acc": 0.5, "test_accs": [0.5], "test_correct": [1, 0, 1, 0]}
    d = np.array([0, 1, 0, 0], dtype=float)
    assert accuracy_noise(a, b, "test_acc") == pytest.approx(d.std(ddof=1) / 2)
    assert accuracy_noise(a, a, "test_acc") == 0.0  # same predictions: no noise in the difference
    # without per-sample records: independent binomial errors over n samples
    a2, b2 = {"test_acc": 0.75}, {"test_acc": 0.5}
    assert accuracy_noise(a2, b2, "test_acc", 4) == pytest.approx(np.sqrt(0.75 * 0.25 / 4 + 0.25 / 4))
    assert "+25.00 points, within 2 standard errors" in comparison_verdict(a, b, "test_acc", 4)


def test_distillation_pulls_student_to_teacher_and_checks_args(digits_mlp):
    """fine_tune(teacher=...): alpha=1 trains on the teacher's soft labels only, so the student's
    predictions agree with the teacher's more than with a CE-only student trained on shuffled labels."""
    m, x, y = digits_mlp
    y_bad = np.random.default_rng(0).permutation(y)  # labels that carry no information
    agree = {}
    for alpha in (0.0, 1.0):
        torch.manual_seed(0)
        s = nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 10))
        qat.fine_tune(s, x, y_bad, epochs=15, lr=1e-2, teacher=m, distill_alpha=alpha, distill_temperature=2.0)
        agree[alpha] = float((qat.predict(s, x).argmax(1) == qat.predict(m, x).argmax(1)).mean())
    assert agree[1.0] > 0.9 and agree[0.0] < 0.5, agree
    teacher_before = {k: v.clone() for k, v in m.state_dict().items()}
    s = nn.Sequential(nn.Linear(64, 10))
    qat.fine_tune(s, x, y, epochs=1, teacher=m, distill_alpha=0.5)
    assert all(torch.equal(v, teacher_before[k]) for k, v in m.state_dict().items())  # teacher not trained
    with pytest.raises(QDeployError, match="teacher .* or a loss_fn"):
        qat.fine_tune(s, x, y, epochs=1, teacher=m, loss_fn=lambda o, t: o.sum())
    with pytest.raises(QDeployError, match="alpha"):
        qat.fine_tune(s, x, y, epochs=1, teacher=m, distill_alpha=1.5)
    with pytest.raises(QDeployError, match="temperature"):
        qat.fine_tune(s, x, y, epochs=1, teacher=m, distill_temperature=0.0)


def test_wide_layers_get_32_bit_biases_that_are_not_clipped(tmp_path):
    """Int16Bias (scale = input scale x weight scale) clipped the biases of wide layers towards
    zero: with 12-bit weights and 12-bit inputs a 16-bit bias spans ~2**-8 of the products' range.
    Above 16 weight + input bits the builders use Int32Bias; the quantized bias then equals the
    float bias to its grid, in the Sequential and in the torch.fx builder, and the model compiles
    exactly (the artifact equals the Brevitas module)."""
    torch.manual_seed(0)
    fm = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        fm[0].bias.copy_(torch.linspace(-1.5, 1.5, 6))
        fm[2].bias.copy_(torch.tensor([0.75, -0.5, 0.25]))
    x = np.random.default_rng(0).uniform(0, 1, (64, 8)).astype(np.float32)

    def quant_bias(model, name):  # the layer's bias as Brevitas quantizes it for its actual input
        layer, seen = model.get_submodule(name), []
        h = layer.register_forward_hook(lambda m, a, o: seen.append(a[0]))
        with torch.no_grad():
            model(torch.as_tensor(x))
            h.remove()
            return layer.bias_quant(layer.bias, seen[0], layer.quant_weight())

    for wide, want_bits in ((8, 16), (12, 32)):
        bits = {"0": (wide, wide), "2": (wide, wide)}
        q = qat.build_qat_model(fm, bits, input_bits=wide, input_scale=2.0 ** -(wide - 1), calibration_x=x)
        for name, fl in (("0", fm[0]), ("2", fm[2])):
            qb = quant_bias(q, name)
            assert int(qb.bit_width) == want_bits
            if want_bits == 32:  # on its grid, not clipped
                assert torch.allclose(qb.value, fl.bias, atol=float(qb.scale.max()))
    # the same through the torch.fx builder (a model that is not a plain Sequential)
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, t):
            return self.b(torch.relu(self.a(t)) + t)
    r = Res()
    with torch.no_grad():
        r.a.bias.copy_(torch.linspace(-1, 1, 8))
    q = qat.build_qat_model(r, {"a": (12, 12), "b": (12, 12)}, input_bits=12, input_scale=2.0 ** -11,
                            calibration_x=x)
    qb = quant_bias(q, "a")
    assert int(qb.bit_width) == 32 and torch.allclose(qb.value, r.a.bias, atol=float(qb.scale.max()))
    p = qat.export_qonnx(q, x[:1], tmp_path / "r.onnx")
    res = qdeploy.compile(str(p), target="reference", out_dir=tmp_path / "c")
    assert res.report["exactness"]["bit_exact"]
    got = np.asarray(qdeploy.run(tmp_path / "c", x[:32]))
    assert np.max(np.abs(got - qat.predict(q, x[:32]))) < 1e-5
