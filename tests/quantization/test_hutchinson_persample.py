"""Per-sample Hutchinson probes (estimator="per_sample"): the patches it builds equal the convolution,
its traces agree with the exact Hessian (torch.func.hessian) of a smooth Conv1d/Tanh net within 4
standard errors, the early stop on the standard error holds what it says, and bad settings are
one-line errors."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from qdeploy.compiler.errors import QDeployError
from qdeploy.compiler.quantization.hutchinson import hutchinson_traces
from qdeploy.compiler.quantization.hutchinson_persample import conv_patches, rademacher


def test_patches_times_weight_equal_the_convolution():
    torch.manual_seed(0)
    cases = [(nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2), (3, 4, 7, 9)),
             (nn.Conv1d(3, 6, 5, stride=2, padding=2, groups=3), (2, 3, 11)),
             (nn.Conv2d(1, 8, 3, padding=1), (5, 1, 8, 8))]
    for m, shp in cases:
        x = torch.randn(*shp)
        u = conv_patches(m, x)
        w = m.weight.reshape(m.groups, m.out_channels // m.groups, -1)
        got = torch.einsum("gok,ngkl->ngol", w, u).reshape(x.shape[0], m.out_channels, -1)
        ref = m._conv_forward(x, m.weight, None).reshape(x.shape[0], m.out_channels, -1)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_rademacher_entries_are_balanced_signs():
    r = rademacher((400, 500), torch.Generator().manual_seed(1))
    assert set(r.unique().tolist()) == {-1.0, 1.0} and r.shape == (400, 500)
    assert abs(float(r.mean())) < 5 / np.sqrt(r.numel())  # 5 standard deviations of the mean


def _smooth_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, padding=1, groups=2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 5, 6), nn.Tanh(), nn.Linear(6, 3))


def _exact(model, x, y, key):
    p = {k: v.detach() for k, v in model.named_parameters()}

    def f(w):
        return nn.functional.cross_entropy(functional_call(model, {**p, key: w}, (x,)), y)

    h = hessian(f)(p[key])
    n = p[key].numel()
    return float(h.reshape(n, n).trace())


@pytest.mark.parametrize("blockwise", [False, True])
def test_per_sample_traces_match_the_exact_hessian_of_a_smooth_net(blockwise):
    m = _smooth_net()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 2, 10, generator=g), torch.randint(0, 3, (30,), generator=g)
    r = hutchinson_traces(m, (x, y), tol=0.0, max_probes=400, batch_probes=100, blockwise=blockwise)
    assert r.estimator == "per_sample" and r.probes == 400
    for name, lt in r.weights.items():
        exact = _exact(m, x, y, f"{name}.weight")
        assert lt.stderr > 0 and abs(lt.trace - exact) < 4 * lt.stderr, (name, lt.trace, exact, lt.stderr)
    # the joint estimator (PyHessian's) still runs on request, on the same quantity
    j = hutchinson_traces(m, (x, y), tol=0.0, max_probes=100, batch_probes=100, estimator="joint")
    assert j.estimator == "joint"
    for name, lt in j.weights.items():
        assert abs(lt.trace - r.weights[name].trace) < 4 * np.hypot(lt.stderr, r.weights[name].stderr)


def test_early_stop_on_the_standard_error():
    m = _smooth_net()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 2, 10, generator=g), torch.randint(0, 3, (64,), generator=g)
    r = hutchinson_traces(m, (x, y), tol=0.0, rel_se=0.05, max_probes=2000, batch_probes=5, min_probes=10)
    assert r.converged and 10 <= r.probes < 2000
    for lt in r.weights.values():
        assert lt.stderr <= 0.05 * abs(lt.trace)
    capped = hutchinson_traces(m, (x, y), tol=0.0, rel_se=1e-6, max_probes=20, batch_probes=10)
    assert not capped.converged and capped.probes == 20


def test_bad_settings_are_one_line_errors():
    m = _smooth_net()
    x, y = torch.randn(8, 2, 10), torch.randint(0, 3, (8,))
    with pytest.raises(QDeployError, match="hvp='rev' selects an HVP of the joint estimator"):
        hutchinson_traces(m, (x, y), estimator="per_sample", hvp="rev", max_probes=2)
    with pytest.raises(QDeployError, match="estimator must be"):
        hutchinson_traces(m, (x, y), estimator="both", max_probes=2)
    with pytest.raises(QDeployError, match=r"rel_se must be a number in \(0, 1\)"):
        hutchinson_traces(m, (x, y), rel_se=2.0, max_probes=2)
    same = nn.Sequential(nn.Conv1d(2, 4, 3, padding="same"), nn.Tanh(), nn.Flatten(), nn.Linear(40, 3))
    with pytest.raises(QDeployError, match=r"estimator='per_sample': conv layer '0' has padding 'same'"):
        hutchinson_traces(same, (x, y), estimator="per_sample", max_probes=2)
    auto = hutchinson_traces(same, (x, y), max_probes=2, tol=0.0)  # "auto": the joint estimator there
    assert auto.estimator == "joint" and auto.probes == 2


def test_numpy_sign_draws_are_balanced_and_independent_bits():
    from qdeploy.compiler.quantization.hutchinson_persample import _signs

    s = _signs(np.random.default_rng(3), 200_003)
    assert s.dtype == np.float32 and s.shape == (200_003,) and set(np.unique(s).tolist()) == {-1.0, 1.0}
    assert abs(float(s.mean())) < 5 / np.sqrt(s.size)
    # neighbouring entries (bits of one byte, and across bytes) are uncorrelated
    for lag in (1, 7, 8):
        assert abs(float((s[:-lag] * s[lag:]).mean())) < 5 / np.sqrt(s.size - lag)


def _relu_cnn():
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(3 * 3 * 3, 8), nn.ReLU(), nn.Linear(8, 4))


@pytest.mark.parametrize("blockwise", [True, False])
def test_per_sample_traces_match_the_exact_gauss_newton_traces_of_a_relu_cnn(blockwise):
    # independent oracle: ggn_exact_traces (closed form, no probes; exact for piecewise-linear nets)
    from qdeploy.compiler.quantization.hessian import ggn_exact_traces

    m = _relu_cnn()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(40, 1, 6, 6, generator=g), torch.randint(0, 4, (40,), generator=g)
    ex = ggn_exact_traces(m, (x, y), activations=True)
    r = hutchinson_traces(m, (x, y), activations=True, tol=0.0, max_probes=300, batch_probes=50, blockwise=blockwise)
    assert r.estimator == "per_sample" and r.probes == 300
    for kind in ("weights", "activations"):
        got, want = getattr(r, kind), getattr(ex, kind)
        assert set(got) == set(want) and got
        for name, lt in got.items():
            assert lt.stderr > 0 and abs(lt.trace - want[name].trace) < 4 * lt.stderr, (kind, name, lt.trace,
                                                                                        want[name].trace, lt.stderr)


def test_chunked_graphs_give_the_passes_of_one_stacked_graph(monkeypatch):
    # one graph with passes stacked side by side vs the data split into chunks whose graphs are
    # rebuilt every pass: the same probes (32 samples: whole bytes per pass), the same values
    from qdeploy.compiler.quantization import hutchinson_persample as hp

    m = _relu_cnn()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(32, 1, 6, 6, generator=g), torch.randint(0, 4, (32,), generator=g)
    kw = dict(activations=True, tol=0.0, max_probes=12, batch_probes=5, seed=9)
    whole = hutchinson_traces(m, (x, y), **kw)
    monkeypatch.setattr(hp, "MAX_ELEMS", 9 * 36 * 10)  # conv patches 9 x 36 per sample: 10 samples per graph, 4 chunks
    chunked = hutchinson_traces(m, (x, y), **kw)
    for kind in ("weights", "activations"):
        for k, lt in getattr(whole, kind).items():
            np.testing.assert_allclose(lt.samples, getattr(chunked, kind)[k].samples, rtol=2e-4, atol=1e-6)


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))  # self.a used twice


def test_a_layer_used_twice_is_refused_by_per_sample_and_auto_takes_the_joint_estimator():
    m = _Shared()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    with pytest.raises(QDeployError, match=r"estimator='per_sample': layer 'a' runs 2 times per forward"):
        hutchinson_traces(m, (x, y), estimator="per_sample", max_probes=2)
    r = hutchinson_traces(m, (x, y), max_probes=400, batch_probes=100, tol=0.0)
    assert r.estimator == "joint"
    assert abs(r.weights["a"].trace - _exact(m, x, y, "a.weight")) < 4 * r.weights["a"].stderr


def test_linear_on_sequences_matches_the_exact_hessian():
    # a Linear applied to (N, T, features): the Kronecker probe (b not integrated out) path
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(15, 3))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(24, 3, 4, generator=g), torch.randint(0, 3, (24,), generator=g)
    r = hutchinson_traces(m, (x, y), tol=0.0, max_probes=300, batch_probes=100)
    assert r.estimator == "per_sample"
    for name, lt in r.weights.items():
        exact = _exact(m, x, y, f"{name}.weight")
        assert lt.stderr > 0 and abs(lt.trace - exact) < 4 * lt.stderr, (name, lt.trace, exact, lt.stderr)
