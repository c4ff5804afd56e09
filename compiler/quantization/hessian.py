"""Per-layer Hessian traces: the result types and helpers every estimator shares, and exact
traces for piecewise-linear networks (:func:`ggn_exact_traces`, the Gauss-Newton identity below).

Hutchinson's stochastic estimator, for any model, is :func:`.hutchinson.hutchinson_traces`; with
``method="auto"`` it uses the exact traces here when :func:`ggn_exact_qualifies`.  Both return a
:class:`TraceResult` of per-layer :class:`LayerTrace` s (weights, and optionally each weight
layer's input activation: the Hessian w.r.t. a zero perturbation added to that input, HAWQ-V2
Sec. 3.3, Dong et al., arXiv 1911.03852; see :mod:`.sensitivity` for how the traces are used).
The model runs in eval mode and the caller's train/eval state is restored afterwards.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import QDeployError

__all__ = ["WEIGHT_TYPES", "LayerTrace", "TraceResult", "weight_layers", "trace_batches", "model_dtype", "layer_inputs",
           "resolve_trace_layers", "ggn_exact_traces", "ggn_exact_qualifies"]

WEIGHT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class LayerTrace:
    """Trace of one tensor's Hessian block: a Hutchinson estimate, or exact (GGN: ``stderr`` 0,
    ``probes`` 0, no ``samples``).

    Attributes:
        name: module name (``model.named_modules()``), or ``"<name>:act"`` for its input activation.
        trace: estimate of Tr(H_ii) (units: loss / weight^2, or loss / activation^2).
        stderr: standard error of ``trace`` (sample std / sqrt(probes)).
        probes: probes used.
        n: entries of the tensor (n_i weights, or N * features for an activation).
        samples: per-probe values v_i^T (Hv)_i, length ``probes``.
    """

    name: str
    trace: float
    stderr: float
    probes: int
    n: int
    samples: list = field(default_factory=list, repr=False)

    @property
    def mean(self) -> float:
        """Average Hessian diagonal, Tr(H_ii) / n_i (HAWQ-V2's normalized trace)."""
        return self.trace / max(self.n, 1)

    def to_dict(self) -> dict:
        return {"name": self.name, "trace": self.trace, "stderr": self.stderr, "probes": self.probes,
                "n": self.n, "mean_trace": self.mean}


@dataclass
class TraceResult:
    """Traces of all weight layers (and their input activations when asked), in model order."""

    weights: dict[str, LayerTrace]
    activations: dict[str, LayerTrace]
    probes: int
    seconds: float
    converged: bool
    estimator: str = ""  # Hutchinson: "per_sample" or "joint" (hutchinson.py); exact traces: ""


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every Linear/Conv1d/2d/3d (Brevitas Quant* subclass them), in order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, WEIGHT_TYPES)]


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of ``model``'s first floating parameter (float32 when it has none): the
    dtype its inputs must have."""
    return next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)


def trace_batches(data, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` or a list of such pairs -> list of ``(x as dtype, y)`` tensor pairs (``dtype``:
    the model's, :func:`model_dtype`; float64 NumPy data for a float32 model is cast).

    Raises:
        QDeployError: no batch given.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data[0], (tuple, list)):
        data = [data]
    out = []
    for x, y in data:
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=dtype)
        y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
        out.append((x, y))
    if not out:
        raise QDeployError("Hessian trace needs at least one batch of data")
    return out


@torch.no_grad()
def layer_inputs(model: nn.Module, x, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Input tensors of the named modules for input batch ``x`` (eval mode), shape (N, ...)."""
    mods = dict(model.named_modules())
    got: dict[str, torch.Tensor] = {}
    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: got.__setitem__(n, a[0].detach()))
             for n in names]
    was = model.training
    model.eval()
    try:
        model(torch.as_tensor(x, dtype=model_dtype(model)))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return got


def logits(out):
    """The logits tensor of a model output: ``out.value`` for a Brevitas ``QuantTensor``, else ``out``."""
    return getattr(out, "value", out)


def resolve_trace_layers(model, mods: dict, layers) -> list[str]:
    """The weight layers to trace: ``layers`` checked against the model, or all Linear/Conv.

    Raises:
        QDeployError: no traceable layer, an unknown module name, or a module without weights.
    """
    if layers is None:
        layers = [n for n, _ in weight_layers(model)]
    if not layers:
        raise QDeployError("the model has no Linear/Conv layer to trace")
    for n in layers:
        if n not in mods:
            raise QDeployError(f"no module named {n!r} in the model")
        if not isinstance(getattr(mods[n], "weight", None), torch.Tensor):
            raise QDeployError(f"module {n!r} ({type(mods[n]).__name__}) has no weight tensor")
    return list(layers)


# --------------------------------------------------------------------------------------------------
# Exact traces for piecewise-linear networks (Gauss-Newton identity)
#
# For a network whose logits z are piecewise linear in the output of every weight layer (Linear/Conv
# followed only by ReLU-like, pooling, reshaping and eval-mode affine modules), d^2 z / dW_i^2 = 0
# almost everywhere, so the Hessian block of the cross-entropy loss (mean over N samples) is its
# Gauss-Newton block:  H_ii = (1/N) sum_n J_ni^T (diag(p_n) - p_n p_n^T) J_ni,  J_ni = dz_n/dW_i, and
#
#   Tr(H_ii) = (1/N) sum_n [ sum_c p_nc ||dz_nc/dW_i||^2 - || sum_c p_nc dz_nc/dW_i ||^2 ],
#
# exactly, from C vector-Jacobian products per sample.  The same holds for the input activation of a
# layer (dz_n/de_n in place of dz_n/dW_i).
# --------------------------------------------------------------------------------------------------

_PL_LEAVES = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ReLU6, nn.Hardtanh,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Flatten, nn.Unflatten, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,  # identity in eval mode
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,  # affine in eval mode (running statistics)
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
)


def _is_cross_entropy(loss_fn) -> tuple[bool, str]:
    if loss_fn is None or loss_fn is nn.functional.cross_entropy:
        return True, ""
    if type(loss_fn) is nn.CrossEntropyLoss:
        if loss_fn.weight is not None or loss_fn.reduction != "mean":
            return False, "CrossEntropyLoss with class weights or reduction != 'mean'"
        return True, ""
    return False, f"loss {loss_fn!r} is not (mean) cross-entropy"


def ggn_exact_qualifies(model: nn.Module, loss_fn: Callable | None = None, data=None) -> tuple[bool, str]:
    """Whether :func:`ggn_exact_traces` is exact for this model: ``(ok, reason_if_not)``.

    Qualifies: an ``nn.Sequential`` tree (or a single leaf) of exactly the types in ``_PL_LEAVES``
    (Linear/Conv, ReLU-like, max/avg pooling, flatten, padding, and batch-norm/dropout, which are
    affine/identity in eval mode, where traces are always taken); subclasses (e.g. Brevitas Quant*
    layers) and custom modules do not, since their forward is not known to be piecewise linear.
    The loss must be mean cross-entropy (``None``, ``F.cross_entropy`` or a plain
    ``nn.CrossEntropyLoss``).  With ``data``, each weight layer must run once per forward, the
    logits must be (N, C) and no label may be negative (an ignore index).
    """
    ok, why = _is_cross_entropy(loss_fn)
    if not ok:
        return False, why
    for name, m in model.named_modules():
        if type(m) is nn.Sequential:
            continue
        if type(m) not in _PL_LEAVES:
            return False, f"module {name or '<root>'!r} ({type(m).__name__}) is not a known piecewise-linear module"
    if not weight_layers(model):
        return False, "the model has no Linear/Conv layer"
    if data is not None:
        x, y = trace_batches(data, model_dtype(model))[0]
        if y.dtype.is_floating_point or bool((y < 0).any()):
            return False, "labels must be non-negative class indices"
        calls: dict[str, int] = {}
        hooks = [m.register_forward_hook(lambda m, a, o, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
                 for n, m in weight_layers(model)]
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = logits(model(x[:2]))
        finally:
            model.train(was)
            for h in hooks:
                h.remove()
        multi = [n for n, c in calls.items() if c != 1]
        if multi:
            return False, f"weight layer(s) {multi} run more than once per forward"
        if out.dim() != 2:
            return False, f"logits have shape {tuple(out.shape)}, not (N, C)"
    return True, ""


def ggn_exact_traces(
    model: nn.Module,
    data,
    loss_fn: Callable | None = None,
    layers: Sequence[str] | None = None,
    activations: Sequence[str] | bool = False,
    chunk: int = 1024,
    mode: str = "outputs",
    check: bool = True,
    progress: Callable[[int], None] | None = None,
) -> TraceResult:
    """Exact Tr(H_ii) of the mean cross-entropy for a piecewise-linear network (no probes).

    Uses Tr(H_ii) = (1/N) sum_n [sum_c p_nc ||dz_nc/dW_i||^2 - ||sum_c p_nc dz_nc/dW_i||^2] (module
    comment above), exact almost everywhere when :func:`ggn_exact_qualifies`.  Same arguments and
    result type as :func:`.hutchinson.hutchinson_traces` (``stderr`` 0, ``probes`` 0, ``samples`` empty).

    Args:
        chunk: samples per vectorized chunk (memory ~ chunk * C * largest weight/activation).
        mode: ``"outputs"`` (default): one forward, then C vjps (``vmap`` over classes) of the logits
            w.r.t. a zero perturbation of every weight layer's output give dz_nc/d(out_i) for all
            samples at once; per-sample weight Jacobians follow from each layer's own (linear)
            function: for a 2-D Linear, ||dz_nc/dW||^2 factorizes as ||g_nc||^2 ||a_n||^2, for
            others a ``vmap``-ed local vjp.  ``"persample"``: ``vmap`` over samples of ``jacrev``
            (C vjps) of the whole network w.r.t. all weights.  ``benchmarks/hessian_trace.py``
            times both.
        check: verify :func:`ggn_exact_qualifies` first (raise :class:`QDeployError` if not).
    """
    from torch.func import functional_call, jacrev, vjp, vmap

    if mode not in ("outputs", "persample"):
        raise QDeployError(f"mode must be 'outputs' or 'persample', got {mode!r}")
    if check:
        ok, why = ggn_exact_qualifies(model, loss_fn, data)
        if not ok:
            raise QDeployError(f"exact GGN traces need a piecewise-linear model with cross-entropy: {why}")
    mods = dict(model.named_modules())
    layers = resolve_trace_layers(model, mods, layers)
    act_names = list(layers[1:]) if activations is True else (list(activations) if activations else [])
    batches = trace_batches(data, model_dtype(model))
    total_n = sum(int(x.shape[0]) for x, _ in batches)
    chunk = max(1, int(chunk))

    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    wsum = {n: 0.0 for n in layers}
    asum = {n: 0.0 for n in act_names}
    a_n = {n: 0 for n in act_names}
    ctx: dict = {}
    hooks = [mods[n].register_forward_pre_hook(
        lambda m, a, n=n: (a[0] + ctx["e"][n],) + tuple(a[1:]) if "e" in ctx and n in ctx["e"] else None)
        for n in act_names]
    hooks += [mods[n].register_forward_hook(
        lambda m, a, o, n=n: o + ctx["d"][n] if "d" in ctx and n in ctx["d"] else None) for n in layers]
    try:
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = {k: v.detach() for k, v in model.named_buffers()}

        def fwd(x, d=None, e=None, w=None):
            ctx.clear()
            if d is not None:
                ctx["d"] = d
            if e is not None:
                ctx["e"] = e
            try:
                return logits(functional_call(model, ({**params, **(w or {})}, buffers), (x,)))
            finally:
                ctx.clear()

        done = 0
        for xb, _ in batches:
            for s in range(0, int(xb.shape[0]), chunk):
                x = xb[s:s + chunk]
                with torch.no_grad():
                    ins = layer_inputs(model, x, list(dict.fromkeys(list(layers) + act_names)))
                    outs = {}
                    hk = [mods[n].register_forward_hook(lambda m, a, o, n=n: outs.__setitem__(n, o.detach()))
                          for n in layers]
                    try:
                        z = fwd(x)
                    finally:
                        for h in hk:
                            h.remove()
                    p = torch.softmax(z, dim=1)  # (N, C)
                C = z.shape[1]
                if mode == "outputs":
                    d0 = {n: torch.zeros_like(outs[n]) for n in layers}
                    e0 = {n: torch.zeros_like(ins[n]) for n in act_names}
                    _, vf = vjp(lambda d, e: fwd(x, d, e), d0, e0)
                    cot = torch.eye(C, dtype=z.dtype)[:, None, :].expand(C, x.shape[0], C)
                    G, E = vmap(vf)(cot)  # {n: (C, N, *out)}, {n: (C, N, *in)}
                    for n in layers:
                        wsum[n] += float(_local_weight_term(mods[n], ins[n], G[n], p, vjp, vmap, functional_call))
                    for n in act_names:
                        asum[n] += float(_ggn_term(E[n].transpose(0, 1).flatten(2), p))
                else:
                    wk = {f"{n}.weight": params[f"{n}.weight"] for n in layers}
                    e0 = {n: torch.zeros_like(ins[n][0]) for n in act_names}

                    def f1(w, e, xn):
                        return fwd(xn[None], None, {k: v[None] for k, v in e.items()}, w)[0]

                    J = vmap(jacrev(f1, argnums=(0, 1)), in_dims=(None, None, 0))(wk, e0, x)
                    for n in layers:
                        wsum[n] += float(_ggn_term(J[0][f"{n}.weight"].flatten(2), p))
                    for n in act_names:
                        asum[n] += float(_ggn_term(J[1][n].flatten(2), p))
                for n in act_names:
                    a_n[n] += int(ins[n].numel())
                done += int(x.shape[0])
                if progress is not None:
                    progress(done)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)

    def mk(name, tr, n):
        return LayerTrace(name=name, trace=tr / total_n, stderr=0.0, probes=0, n=n, samples=[])

    wres = {n: mk(n, wsum[n], int(mods[n].weight.numel())) for n in layers}
    ares = {n: mk(n, asum[n], a_n[n]) for n in act_names}
    return TraceResult(weights=wres, activations=ares, probes=0, seconds=time.perf_counter() - t0, converged=True)


def _ggn_term(J: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """sum_n [sum_c p_nc ||J_nc||^2 - ||sum_c p_nc J_nc||^2] for J (N, C, K), p (N, C)."""
    J = J.double()
    p = p.double()
    first = (p * J.pow(2).sum(-1)).sum()
    second = torch.einsum("nc,nck->nk", p, J).pow(2).sum()
    return first - second


def _local_weight_term(mod, a, G, p, vjp, vmap, functional_call) -> torch.Tensor:
    """The sum of :func:`_ggn_term` over samples for dz_nc/dW of one layer, from its input a (N, *in)
    and the logits' gradients at its output G (C, N, *out)."""
    if type(mod) is nn.Linear and a.dim() == 2:
        # dz_nc/dW = g_nc a_n^T: ||.||^2 = ||g_nc||^2 ||a_n||^2, sum_c p g a^T = (sum_c p g) a^T
        g = G.transpose(0, 1).double()  # (N, C, out)
        pp = p.double()
        inner = (pp * g.pow(2).sum(-1)).sum(1) - torch.einsum("nc,nco->no", pp, g).pow(2).sum(1)
        return (inner * a.double().pow(2).sum(1)).sum()
    if (type(mod) is nn.Conv2d and mod.groups == 1 and mod.padding_mode == "zeros"
            and not isinstance(mod.padding, str)):
        # dz_nc/dW = G_nc (Cout, L) @ unfold(a_n)^T (L, Cin*kh*kw): one batched matmul
        U = nn.functional.unfold(a, mod.kernel_size, dilation=mod.dilation, padding=mod.padding,
                                 stride=mod.stride)  # (N, Cin*k, L)
        g = G.transpose(0, 1).flatten(3)  # (N, C, Cout, L)
        J = torch.einsum("ncol,nkl->ncok", g, U)
        return _ggn_term(J.flatten(2), p)
    w0 = mod.weight.detach()
    others = {k: v.detach() for k, v in mod.named_parameters() if k != "weight"}

    def jac(an, gnc):  # dz_nc/dW for one sample and class: vjp of W -> mod(a_n) at g_nc
        _, vf = vjp(lambda w: functional_call(mod, {**others, "weight": w}, (an[None],)), w0)
        return vf(gnc[None])[0]

    J = vmap(vmap(jac, in_dims=(None, 0)), in_dims=(0, 1))(a, G)  # (N, C, *W)
    return _ggn_term(J.flatten(2), p)
