"""Per-layer Hessian traces by Hutchinson's estimator, with Hessian-vector products in ``torch.func``.

For a loss L(W) and a layer i with weight tensor W_i (n_i entries), Hutchinson's estimator gives

    Tr(H_ii) = E_v[ v_i^T (H v)_i ],     v Rademacher (entries +-1, independent),

(Hutchinson 1990; used per layer by HAWQ-V2, Dong et al., arXiv 1911.03852, Sec. 3, and by
PyHessian, Yao et al., arXiv 1912.07145, Alg. 1).  With a *joint* probe v over all layers at once
(PyHessian's ``trace``), one Hessian-vector product gives an unbiased sample for every layer,
because the cross terms v_i^T H_ij v_j (i != j) have zero mean; with *block* probes (HAWQ-V2) each
layer gets its own HVP, fewer variance terms, L times the cost.

The HVP is reverse-over-reverse in ``torch.func`` by default (``grad(loss)`` linearized once per
batch with ``vjp``, each probe one ``vjp`` of it; H is symmetric, so that is H v), or
forward-over-reverse (``hvp="fwd"``: ``jvp`` of ``grad(loss)``); both are batched over probes
with ``vmap``.  The model runs in eval mode (batch-norm uses its running statistics,
dropout is off) and the caller's train/eval state is restored afterwards, so a model left in train
mode gives the same traces as one in eval mode.

Activation traces (HAWQ-V2 Sec. 3.3): a zero perturbation e_i is added to the *input* of each
weight layer (a forward pre-hook) and the Hessian of the mean loss with respect to e_i, over all
samples of the batch, is estimated the same way.  Its trace divided by the number of activation
entries n_a = N * prod(input shape), times ||Q_b(a) - a||^2 summed over the N samples, estimates
the loss increase from quantizing that activation (see :mod:`.sensitivity`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import QDeployError

__all__ = ["LayerTrace", "TraceResult", "weight_layers", "hutchinson_traces", "layer_inputs", "ggn_exact_traces",
           "ggn_exact_qualifies"]

WEIGHT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class LayerTrace:
    """Hutchinson estimate for one tensor.

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


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every Linear/Conv1d/2d/3d (Brevitas Quant* subclass them), in order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, WEIGHT_TYPES)]


def _batches(data) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` or a list of such pairs -> list of tensor pairs."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data[0], (tuple, list)):
        data = [data]
    out = []
    for x, y in data:
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float32)
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
        model(torch.as_tensor(x, dtype=torch.float32))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return got


def logits(out):
    """The logits tensor of a model output: ``out.value`` for a Brevitas ``QuantTensor``, else ``out``."""
    return getattr(out, "value", out)


def _resolve_layers(model, mods: dict, layers) -> list[str]:
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


def hutchinson_traces(
    model: nn.Module,
    data,
    loss_fn: Callable | None = None,
    layers: Sequence[str] | None = None,
    activations: Sequence[str] | bool = False,
    tol: float = 1e-3,
    max_probes: int = 100,
    min_probes: int = 10,
    batch_probes: int = 10,
    blockwise: bool = False,
    seed: int = 0,
    vectorize: bool = True,
    progress: Callable[[int], None] | None = None,
    hvp: str = "autograd",
    method: str = "hutchinson",
) -> TraceResult:
    """Estimate Tr(H_ii) for each weight layer (and optionally each layer's input activation).

    Args:
        model: a torch module (float or Brevitas).  Run in eval mode; its mode is restored.
        data: ``(x, y)`` tensors/arrays, or a list of such batches; the Hessian is that of the
            sample-weighted mean loss over all batches (as PyHessian's ``dataloader_hv_product``).
        loss_fn: ``loss_fn(logits, y) -> scalar`` (mean over the batch); default cross-entropy.
        layers: module names of weight layers; default all Linear/Conv layers.
        activations: True for the inputs of all ``layers`` except the first (the model input),
            or a list of layer names whose input activation is traced.
        tol: relative tolerance: stop when, after a chunk of ``batch_probes`` probes, every running
            mean changed by less than ``tol`` relative to its previous value (PyHessian's rule,
            applied per layer), once ``min_probes`` probes are in.
        max_probes: probe cap (default 100).
        batch_probes: probes per vectorized chunk (``vmap`` width).
        blockwise: one probe per layer (HAWQ-V2) instead of one joint probe (PyHessian).
        seed: seeds the Rademacher generator (a private ``torch.Generator``): reproducible.
        vectorize: ``vmap`` over probes (else a Python loop over probes).
        progress: called with the number of probes done after each chunk.
        hvp: ``"autograd"`` (the default): the gradient is built once per batch with
            ``create_graph=True`` and each probe is one ``torch.autograd.grad`` through it (double
            backward, PyHessian's HVP), probes in a loop; ``"rev"`` reverse-over-reverse
            (``torch.func`` ``vjp`` of ``grad``, linearized once per batch) or ``"fwd"``
            forward-over-reverse (``jvp`` of ``grad``), both ``vmap``-ped over the probe chunk when
            ``vectorize``.  ``benchmarks/hessian_trace.py`` times them: on the digits MLP/CNN (1024
            samples, 100 probes, 1 thread, shared CPU) the vmapped modes took 2.9x/3.6x the time
            of PyHessian's loop, so the loop is the default (TOOLCHAIN.md: vmap pays only on tiny nets).
        method: ``"hutchinson"`` (the default, any model), ``"ggn_exact"`` (exact traces, no probes,
            for piecewise-linear networks with cross-entropy; see :func:`ggn_exact_traces`; raises
            if the model does not qualify), or ``"auto"`` (``ggn_exact`` when the model qualifies,
            else Hutchinson).  With ``ggn_exact`` the probe settings are ignored, ``stderr`` is 0
            and ``probes`` is 0.

    Returns:
        :class:`TraceResult` with one :class:`LayerTrace` per layer/activation.

    Raises:
        QDeployError: no weight layers, an unknown layer name, bad probe settings, or no data.
    """
    from torch.func import functional_call, grad, jvp, vjp, vmap

    if method not in ("hutchinson", "ggn_exact", "auto"):
        raise QDeployError(f"method must be 'hutchinson', 'ggn_exact' or 'auto', got {method!r}")
    if method != "hutchinson":
        ok, why = ggn_exact_qualifies(model, loss_fn, data)
        if ok:
            return ggn_exact_traces(model, data, loss_fn=loss_fn, layers=layers, activations=activations,
                                    progress=progress)
        if method == "ggn_exact":
            raise QDeployError(f"method='ggn_exact' needs a piecewise-linear model with cross-entropy: {why}; "
                               "use method='hutchinson' (or 'auto')")
    if hvp not in ("autograd", "fwd", "rev"):
        raise QDeployError(f"hvp must be 'autograd', 'fwd' or 'rev', got {hvp!r}")
    if hvp == "autograd":
        vectorize = False

    if max_probes < 1 or batch_probes < 1:
        raise QDeployError(f"probe counts must be >= 1 (max_probes={max_probes}, batch_probes={batch_probes})")
    loss_fn = loss_fn or nn.functional.cross_entropy
    mods = dict(model.named_modules())
    layers = _resolve_layers(model, mods, layers)
    if activations is True:
        act_names = list(layers[1:])
    elif activations:
        act_names = list(activations)
    else:
        act_names = []
    batches = _batches(data)
    total_n = sum(int(x.shape[0]) for x, _ in batches)

    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = {k: v.detach() for k, v in model.named_buffers()}
        wkeys = [f"{n}.weight" for n in layers]
        w0 = {k: params[k] for k in wkeys}
        # activation perturbations: shape of each layer input per batch
        act_shapes = []
        for x, _ in batches:
            ins = layer_inputs(model, x, act_names) if act_names else {}
            act_shapes.append({n: tuple(ins[n].shape) for n in act_names})
        eps_ctx: dict[str, torch.Tensor] = {}
        hooks = [mods[n].register_forward_pre_hook(
            lambda m, a, n=n: (a[0] + eps_ctx[n],) + tuple(a[1:]) if n in eps_ctx else None)
            for n in act_names]

        def loss_of(w, e, x, y):
            eps_ctx.clear()
            eps_ctx.update(e)
            try:
                out = functional_call(model, ({**params, **w}, buffers), (x,))
            finally:
                eps_ctx.clear()
            return loss_fn(logits(out), y)

        # "rev": linearize grad(loss) once per batch (vjp), then every probe is one vjp of that
        # linearization (H is symmetric, so vjp = H v).  "fwd": H v = jvp(grad(loss), v) per probe.
        # Either is vmapped over the probe chunk.
        lin = []
        for (x, y), shp in zip(batches, act_shapes):
            e0 = {n: torch.zeros(shp[n]) for n in act_names}
            g_fn = lambda w, e, x=x, y=y: grad(loss_of, argnums=(0, 1))(w, e, x, y)
            if hvp == "autograd":
                vjp_fn = _autograd_hvp(loss_of, w0, e0, x, y)
            elif hvp == "rev":
                _, vjp_fn = vjp(g_fn, w0, e0)
            else:
                vjp_fn = (lambda v, g_fn=g_fn, e0=e0: jvp(g_fn, (w0, e0), v)[1])
            lin.append(vjp_fn)

        gen = torch.Generator().manual_seed(int(seed))
        names = list(wkeys) + [f"act:{n}" for n in act_names]
        samples: dict[str, list[float]] = {k: [] for k in names}
        means_prev = None
        converged = False
        done = 0
        try:
            while done < max_probes:
                k = min(batch_probes, max_probes - done)
                vw = {kk: _rademacher((k, *w0[kk].shape), gen) for kk in wkeys}
                ve_b = [{n: _rademacher((k, *s[n]), gen) for n in act_names} for s in act_shapes]
                acc = None
                for (x, y), ve, vjp_fn in zip(batches, ve_b, lin):
                    if blockwise:
                        vals = _blockwise(vjp_fn, vw, ve, vectorize, vmap)
                    else:
                        vals = _joint(vjp_fn, vw, ve, vectorize, vmap)
                    wgt = x.shape[0] / total_n
                    vals = {kk: vv * wgt for kk, vv in vals.items()}
                    acc = vals if acc is None else {kk: acc[kk] + vals[kk] for kk in acc}
                for kk in names:
                    samples[kk].extend(float(t) for t in acc[kk])
                done += k
                if progress is not None:
                    progress(done)
                means = {kk: float(np.mean(samples[kk])) for kk in names}
                if means_prev is not None and done >= min_probes and all(
                        abs(means[kk] - means_prev[kk]) <= tol * (abs(means_prev[kk]) + 1e-12) for kk in names):
                    converged = True
                    break
                means_prev = means
        finally:
            for h in hooks:
                h.remove()
    finally:
        model.train(was_training)

    def mk(key, name, n):
        s = np.asarray(samples[key], dtype=np.float64)
        se = float(s.std(ddof=1) / math.sqrt(len(s))) if len(s) > 1 else float("nan")
        return LayerTrace(name=name, trace=float(s.mean()), stderr=se, probes=len(s), n=n, samples=s.tolist())

    wres = {n: mk(f"{n}.weight", n, int(w0[f"{n}.weight"].numel())) for n in layers}
    ares = {n: mk(f"act:{n}", n, int(sum(int(np.prod(s[n])) for s in act_shapes))) for n in act_names}
    return TraceResult(weights=wres, activations=ares, probes=done, seconds=time.perf_counter() - t0,
                       converged=converged)


def _autograd_hvp(loss_of, w0: dict, e0: dict, x, y):
    """H v by double backward (PyHessian's ``hessian_vector_product``): the gradient graph of the loss
    w.r.t. the weights ``w0`` and activation perturbations ``e0`` is built once; the returned
    function maps one probe ``(vw, ve)`` (dicts of tensors shaped like ``w0``/``e0``) to ``(Hv_w, Hv_e)``."""
    w = {k: t.detach().clone().requires_grad_(True) for k, t in w0.items()}
    e = {k: t.detach().clone().requires_grad_(True) for k, t in e0.items()}
    with torch.enable_grad():
        loss = loss_of(w, e, x, y)
        ins = list(w.values()) + list(e.values())
        gs = torch.autograd.grad(loss, ins, create_graph=True, allow_unused=True)
    wk, ek = list(w), list(e)

    def hvp(v):
        vw, ve = v
        outs = [vw[k] for k in wk] + [ve[k] for k in ek]
        pairs = [(g, t, o) for g, t, o in zip(gs, ins, outs) if g is not None and g.requires_grad]
        with torch.enable_grad():
            hv = torch.autograd.grad([g for g, _, _ in pairs], ins, grad_outputs=[o for _, _, o in pairs],
                                     retain_graph=True, allow_unused=True)
        hv = [torch.zeros_like(t) if h is None else h for h, t in zip(hv, ins)]
        return ({k: hv[i] for i, k in enumerate(wk)}, {k: hv[len(wk) + i] for i, k in enumerate(ek)})
    return hvp


def _rademacher(shape, gen) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=gen, dtype=torch.int8).to(torch.float32).mul_(2).sub_(1)


def _vhv(v, hv) -> dict[str, torch.Tensor]:
    """Per-tensor v^T (Hv) for a batch of probes: {key: (k,)}."""
    vw, ve = v
    hw, he = hv
    out = {kk: (vw[kk] * hw[kk]).flatten(1).sum(1) for kk in vw}
    out.update({f"act:{n}": (ve[n] * he[n]).flatten(1).sum(1) for n in ve})
    return out


def _joint(vjp_fn, vw, ve, vectorize, vmap):
    if vectorize:
        hv = vmap(vjp_fn)((vw, ve))
    else:
        k = next(iter(vw.values())).shape[0] if vw else next(iter(ve.values())).shape[0]
        outs = [vjp_fn(({kk: t[i] for kk, t in vw.items()}, {n: t[i] for n, t in ve.items()})) for i in range(k)]
        hv = ({kk: torch.stack([o[0][kk] for o in outs]) for kk in vw},
              {n: torch.stack([o[1][n] for o in outs]) for n in ve})
    return _vhv((vw, ve), hv)


def _blockwise(vjp_fn, vw, ve, vectorize, vmap):
    """One HVP per (tensor, probe): the probe is zero outside the tensor."""
    out = {}
    keys = [("w", kk) for kk in vw] + [("a", n) for n in ve]
    for kind, key in keys:
        mw = {kk: (t if (kind == "w" and kk == key) else torch.zeros_like(t)) for kk, t in vw.items()}
        me = {n: (t if (kind == "a" and n == key) else torch.zeros_like(t)) for n, t in ve.items()}
        r = _joint(vjp_fn, mw, me, vectorize, vmap)
        name = key if kind == "w" else f"act:{key}"
        out[name] = r[name]
    return out


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
        x, y = _batches(data)[0]
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
    result type as :func:`hutchinson_traces` (``stderr`` 0, ``probes`` 0, ``samples`` empty).

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
    layers = _resolve_layers(model, mods, layers)
    act_names = list(layers[1:]) if activations is True else (list(activations) if activations else [])
    batches = _batches(data)
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
