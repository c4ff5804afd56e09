"""Hutchinson traces: agreement with the exact Hessian, determinism, eval-mode invariance."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from qdeploy.compiler.errors import QDeployError
from qdeploy.compiler.quantization.hessian import weight_layers
from qdeploy.compiler.quantization.hutchinson import hutchinson_traces
from qdeploy.compiler.quantization import sensitivity
from qdeploy.compiler.quantization.sensitivity import (act_sensitivity, quantize_weight_pot,
                                                       weight_sensitivity)


def _data(n=64, d=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)


def _mlp(bn=False, dropout=0.0):
    torch.manual_seed(0)
    layers = [nn.Linear(6, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.ReLU()]
    layers += [nn.Dropout(dropout)] if dropout else []
    layers += [nn.Linear(8, 3)]
    return nn.Sequential(*layers)


def _exact_trace(model, x, y, key):
    model.eval()
    p = {k: v.detach() for k, v in model.named_parameters()}
    b = dict(model.named_buffers())

    def f(w):
        return nn.functional.cross_entropy(functional_call(model, ({**p, key: w}, b), (x,)), y)

    H = hessian(f)(p[key])
    n = p[key].numel()
    return float(H.reshape(n, n).trace())


@pytest.mark.parametrize("blockwise", [False, True])
def test_matches_exact_trace(blockwise):
    m = _mlp(bn=True)
    x, y = _data()
    # give batch-norm non-trivial running statistics
    m.train()
    with torch.no_grad():
        m(x * 2 + 1)
    r = hutchinson_traces(m, (x, y), tol=0.0, max_probes=600, batch_probes=100, blockwise=blockwise)
    for name, lt in r.weights.items():
        exact = _exact_trace(m, x, y, f"{name}.weight")
        assert lt.probes == 600 and lt.stderr > 0
        assert abs(lt.trace - exact) < 4 * lt.stderr + 1e-6, (name, lt.trace, exact, lt.stderr)


def test_activation_trace_matches_exact():
    m = _mlp()
    x, y = _data()
    r = hutchinson_traces(m, (x, y), activations=True, tol=0.0, max_probes=400, batch_probes=100,
                          blockwise=True)
    a = m[1](m[0](x)).detach()
    H = hessian(lambda t: nn.functional.cross_entropy(m[2](t), y))(a)
    exact = float(H.reshape(a.numel(), a.numel()).trace())
    lt = r.activations["2"]
    assert lt.n == a.numel()
    assert abs(lt.trace - exact) < 4 * lt.stderr + 1e-6


def test_train_mode_dropout_and_batchnorm_do_not_change_traces():
    m = _mlp(bn=True, dropout=0.5)
    x, y = _data()
    m.train()
    with torch.no_grad():
        m(x)  # running stats move once, then stay fixed
    r_train = hutchinson_traces(m, (x, y), activations=True, max_probes=20, seed=3)
    assert m.training, "the caller's mode must be restored"
    bn_before = m[1].running_mean.clone()
    m.eval()
    r_eval = hutchinson_traces(m, (x, y), activations=True, max_probes=20, seed=3)
    assert not m.training
    assert torch.equal(bn_before, m[1].running_mean)
    for k in r_train.weights:
        assert r_train.weights[k].samples == r_eval.weights[k].samples
    for k in r_train.activations:
        assert r_train.activations[k].samples == r_eval.activations[k].samples


def test_seeded_vmap_equals_loop_and_tolerance_stop():
    m = _mlp()
    x, y = _data()
    a = hutchinson_traces(m, (x, y), max_probes=20, seed=7, tol=0.0)
    b = hutchinson_traces(m, (x, y), max_probes=20, seed=7, tol=0.0, vectorize=False)
    c = hutchinson_traces(m, (x, y), max_probes=20, seed=7, tol=0.0)
    for k in a.weights:
        assert a.weights[k].samples == c.weights[k].samples  # reproducible
        np.testing.assert_allclose(a.weights[k].samples, b.weights[k].samples, rtol=1e-5, atol=1e-7)
    loose = hutchinson_traces(m, (x, y), max_probes=100, tol=0.5, min_probes=10, seed=7)
    assert loose.converged and loose.probes < 100
    capped = hutchinson_traces(m, (x, y), max_probes=30, tol=1e-12, seed=7)
    assert capped.probes == 30 and not capped.converged


def test_multiple_batches_weighted_mean():
    m = _mlp()
    x, y = _data(n=60)
    whole = hutchinson_traces(m, (x, y), max_probes=10, seed=1, tol=0.0)
    split = hutchinson_traces(m, [(x[:20], y[:20]), (x[20:], y[20:])], max_probes=10, seed=1, tol=0.0)
    for k in whole.weights:
        np.testing.assert_allclose(whole.weights[k].samples, split.weights[k].samples, rtol=1e-4, atol=1e-6)


def test_errors():
    m = _mlp()
    x, y = _data()
    with pytest.raises(QDeployError, match="no module"):
        hutchinson_traces(m, (x, y), layers=["nope"])
    with pytest.raises(QDeployError, match="no weight"):
        hutchinson_traces(m, (x, y), layers=["1"])
    with pytest.raises(QDeployError, match="no Linear/Conv"):
        hutchinson_traces(nn.Sequential(nn.ReLU()), (x, y))
    with pytest.raises(QDeployError, match=">= 1"):
        hutchinson_traces(m, (x, y), max_probes=0)
    assert [n for n, _ in weight_layers(m)] == ["0", "2"]


def test_sensitivity_quantizers():
    w = torch.tensor([0.5, -0.3, 0.02, 0.0])
    q = quantize_weight_pot(w, 4)  # qmax 7, scale 2**ceil(log2(0.5/8)) = 1/16
    assert torch.equal(q, torch.tensor([0.4375, -0.3125, 0.0, 0.0]))
    s = weight_sensitivity(2.0, w, [2, 4, 8])
    assert s[2] >= s[4] >= s[8] >= 0
    a = torch.rand(100, 5)
    sa = act_sensitivity(1.0, a, [2, 8])
    assert sa[2] > sa[8]
    with pytest.raises(QDeployError, match="empty"):
        weight_sensitivity(1.0, w, [])


def test_weight_quantizer_matches_brevitas():
    """The sensitivities and hardware costs quantize weights exactly as the QAT layers
    (Brevitas Int8WeightPerTensorFixedPoint) do, at every candidate width and several ranges."""
    from brevitas.nn import QuantLinear
    from brevitas.quant import Int8WeightPerTensorFixedPoint
    g = torch.Generator().manual_seed(0)
    for bits in range(2, 9):
        for amax in (0.37, 0.5, 0.9, 1.3, 3.0):
            w = torch.randn(12, 20, generator=g)
            w = w / w.abs().max() * amax
            q = QuantLinear(20, 12, weight_quant=Int8WeightPerTensorFixedPoint, weight_bit_width=bits, bias=False)
            with torch.no_grad():
                q.weight.copy_(w)
            qt = q.quant_weight()
            assert float(qt.scale) == 2.0 ** sensitivity.weight_scale_exponent(w, bits), (bits, amax)
            assert torch.equal(qt.value.detach(), quantize_weight_pot(w, bits)), (bits, amax)


def test_forward_over_reverse_equals_reverse_over_reverse():
    m = _mlp()
    x, y = _data()
    a = hutchinson_traces(m, (x, y), activations=True, tol=0.0, max_probes=20, batch_probes=10, hvp="rev")
    b = hutchinson_traces(m, (x, y), activations=True, tol=0.0, max_probes=20, batch_probes=10, hvp="fwd")
    c = hutchinson_traces(m, (x, y), activations=True, tol=0.0, max_probes=20, batch_probes=10,
                          hvp="autograd")  # the joint estimator's default HVP
    for r in (b, c):  # the same probes through three HVP implementations
        for k in a.weights:
            assert r.weights[k].trace == pytest.approx(a.weights[k].trace, rel=1e-4, abs=1e-7)
        for k in a.activations:
            assert r.activations[k].trace == pytest.approx(a.activations[k].trace, rel=1e-4, abs=1e-7)
    assert c.probes == 20 and a.weights[next(iter(a.weights))].trace != 0
    with pytest.raises(QDeployError, match="hvp must be"):
        hutchinson_traces(m, (x, y), max_probes=2, hvp="both")


# --- exact traces for piecewise-linear networks (Gauss-Newton identity, method="ggn_exact")

def _pl_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))


def _pl_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3, padding=1),
                         nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4, 3))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_ggn_exact_equals_brute_force_hessian_and_hutchinson(kind):
    from qdeploy.compiler.quantization.hessian import ggn_exact_traces
    m, shp = (_pl_mlp(), (6,)) if kind == "mlp" else (_pl_cnn(), (1, 4, 4))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, *shp, generator=g), torch.randint(0, 3, (40,), generator=g)
    r = hutchinson_traces(m, (x, y), method="ggn_exact")
    per = ggn_exact_traces(m, [(x[:15], y[:15]), (x[15:], y[15:])], mode="persample", chunk=8)
    h = hutchinson_traces(m, (x, y), tol=0.0, max_probes=1000, batch_probes=250)
    assert r.probes == 0 and r.converged
    for name, lt in r.weights.items():
        exact = _exact_trace(m, x, y, f"{name}.weight")  # torch.func.hessian of the full loss
        assert lt.stderr == 0.0 and lt.n == m.get_submodule(name).weight.numel()
        assert lt.trace == pytest.approx(exact, rel=1e-4), (name, lt.trace, exact)
        assert per.weights[name].trace == pytest.approx(exact, rel=1e-4)
        hl = h.weights[name]
        assert abs(hl.trace - lt.trace) < 4 * hl.stderr, (name, hl.trace, lt.trace, hl.stderr)


def test_ggn_exact_activation_traces_equal_brute_force():
    m = _mlp()  # Linear-ReLU-Linear: activation of layer "2" is the ReLU output
    x, y = _data()
    r = hutchinson_traces(m, (x, y), activations=True, method="ggn_exact")
    a = m[1](m[0](x)).detach()
    H = hessian(lambda t: nn.functional.cross_entropy(m[2](t), y))(a)
    exact = float(H.reshape(a.numel(), a.numel()).trace())
    assert r.activations["2"].n == a.numel()
    assert r.activations["2"].trace == pytest.approx(exact, rel=1e-4)


def test_ggn_exact_qualification():
    from qdeploy.compiler.quantization.hessian import ggn_exact_qualifies
    x, y = _data()
    assert ggn_exact_qualifies(_mlp(bn=True, dropout=0.5), None, (x, y)) == (True, "")
    smooth = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    ok, why = ggn_exact_qualifies(smooth)
    assert not ok and "Tanh" in why
    with pytest.raises(QDeployError, match="piecewise-linear.*Tanh"):
        hutchinson_traces(smooth, (x, y), method="ggn_exact")
    assert not ggn_exact_qualifies(_mlp(), nn.MSELoss())[0]
    lin = nn.Linear(8, 8)
    shared = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), lin, nn.ReLU(), lin, nn.Linear(8, 3))
    ok, why = ggn_exact_qualifies(shared, None, (x, y))
    assert not ok and "more than once" in why
    # "auto": exact when the model qualifies, Hutchinson otherwise
    auto = hutchinson_traces(smooth, (x, y), method="auto", max_probes=20, tol=0.0)
    assert auto.probes == 20
    ex = hutchinson_traces(_mlp(), (x, y), method="auto")
    assert ex.probes == 0 and all(t.stderr == 0 for t in ex.weights.values())
    with pytest.raises(QDeployError, match="method must be"):
        hutchinson_traces(_mlp(), (x, y), method="exact")


def test_float64_model_is_traced_in_its_own_dtype():
    """A float64 model (model.double()) is traced with float64 inputs (they were cast to float32,
    and torch refused the mixed-dtype matmul); same probes, same traces as the float32 copy up to
    float32 rounding; float64 NumPy data into a float32 model is still cast."""
    import copy
    from torch import nn
    from qdeploy.compiler.quantization.hessian import ggn_exact_traces
    from qdeploy.compiler.quantization.hutchinson import hutchinson_traces
    torch.manual_seed(0)
    m32 = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    m64 = copy.deepcopy(m32).double()
    x = np.random.default_rng(0).normal(size=(64, 6))  # float64 data
    y = np.random.default_rng(1).integers(0, 3, 64)
    a = hutchinson_traces(m32, (x, y), max_probes=30, tol=0.0, seed=0)
    b = hutchinson_traces(m64, (x, y), max_probes=30, tol=0.0, seed=0)
    for k in a.weights:
        assert b.weights[k].trace == pytest.approx(a.weights[k].trace, rel=1e-5)
    r32 = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    g32 = ggn_exact_traces(r32, (x, y))
    g64 = ggn_exact_traces(copy.deepcopy(r32).double(), (x, y))
    for k in g32.weights:
        assert g64.weights[k].trace == pytest.approx(g32.weights[k].trace, rel=1e-5)
