"""Per-layer Hessian traces by Hutchinson's estimator, with Hessian-vector products in ``torch.func``
(:func:`hutchinson_traces`; its ``method`` also selects the exact traces of
:func:`~.hessian.ggn_exact_traces`).  Result types and shared helpers are in :mod:`.hessian`.

For a loss L(W) and a layer i with weight tensor W_i (n_i entries), Hutchinson's estimator gives

    Tr(H_ii) = E_v[ v_i^T (H v)_i ],     v Rademacher (entries +-1, independent),

(Hutchinson 1990; used per layer by HAWQ-V2, Dong et al., arXiv 1911.03852, Sec. 3, and by
PyHessian, Yao et al., arXiv 1912.07145, Alg. 1).  With a *joint* probe v over all layers at once
(PyHessian's ``trace``), one Hessian-vector product gives an unbiased sample for every layer,
because the cross terms v_i^T H_ij v_j (i != j) have zero mean; with *block* probes (HAWQ-V2) each
layer gets its own HVP, fewer variance terms, L times the cost.

Two estimators (``estimator``): ``"per_sample"`` (:mod:`.hutchinson_persample`, the default for
networks whose traced layers are plain Linear/Conv1d/Conv2d) gives every *sample* its own probe in
each pass, which removes most of the variance of one joint probe; a pass costs one Hessian-vector
product w.r.t. each traced layer's output, through a gradient graph built once per run (no weight
gradients are formed); ``"joint"`` is PyHessian's estimator below.  Both
can stop early on the standard error (``rel_se``).

For the joint estimator, the HVP is reverse-over-reverse in ``torch.func`` (``grad(loss)`` linearized once per
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
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import QDeployError
from .hessian import (LayerTrace, TraceResult, logits, ggn_exact_qualifies, ggn_exact_traces, layer_inputs,
                      model_dtype, resolve_trace_layers, trace_batches)
from .hutchinson_persample import PerSamplePasses, check_rel_se, per_sample_supported

__all__ = ["hutchinson_traces", "rademacher"]


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
    blockwise: bool | None = None,
    seed: int = 0,
    vectorize: bool = True,
    progress: Callable[[int], None] | None = None,
    hvp: str | None = None,
    method: str = "hutchinson",
    estimator: str = "auto",
    rel_se: float | None = None,
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
        blockwise: ``None`` (the default): True for ``per_sample``, False for ``joint``.  Joint
            estimator: one probe per layer (HAWQ-V2, L times the HVPs) instead of one joint probe
            (PyHessian).  ``per_sample``: each layer's term without the zero-mean cross terms of the
            other layers' probes (one HVP per traced tensor and pass, each only through the graph from
            that tensor on); on the benchmark nets it reaches a 2 % standard error in 1-14x fewer
            passes at 1.2-1.7x the time per pass, hence the default.
        seed: seeds the Rademacher generator (a private ``torch.Generator``): reproducible.
        vectorize: ``vmap`` over probes (else a Python loop over probes); joint ``rev``/``fwd`` only.
        progress: called with the number of probes done after each chunk.
        estimator: ``"auto"`` (the default): ``"per_sample"`` when every traced layer is a plain
            ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` run once per forward and no ``hvp`` is given,
            else ``"joint"``.
            ``"per_sample"`` (:mod:`.hutchinson_persample`): each *probe* is one pass over the data
            with an independent Kronecker-Rademacher probe per sample; unbiased for the same traces,
            with a far smaller variance per pass (on the nets of ``benchmarks/hessian_trace.py``, 1024
            samples, one blockwise pass has a 2-5 % relative standard deviation per layer, one
            PyHessian probe 20-180 %), so ``rel_se`` stops it after a few passes.  ``"joint"``: PyHessian's
            estimator, one Rademacher probe over all weights at once per probe.
        rel_se: early stop on the standard error: stop (``converged``) once, after ``min_probes``,
            every traced tensor's standard error is at most ``rel_se`` times its |mean| (e.g. 0.02);
            checked after each chunk of ``batch_probes``.  None (default): off.  Either this or the
            ``tol`` rule stops the run.
        hvp: the joint estimator's HVP (giving one selects ``estimator="joint"`` under ``"auto"``):
            ``"autograd"`` (its default): the gradient is built once per batch with
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
        QDeployError: no weight layers, an unknown layer name, bad probe settings, no data, or
            ``estimator="per_sample"`` for a layer it does not support (or with an ``hvp``).
    """
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
    if hvp is not None and hvp not in ("autograd", "fwd", "rev"):
        raise QDeployError(f"hvp must be 'autograd', 'fwd' or 'rev', got {hvp!r}")
    if estimator not in ("auto", "per_sample", "joint"):
        raise QDeployError(f"estimator must be 'auto', 'per_sample' or 'joint', got {estimator!r}")
    if estimator == "per_sample" and hvp is not None:
        raise QDeployError(f"hvp={hvp!r} selects an HVP of the joint estimator; it does not apply to "
                           "estimator='per_sample'")
    rel_se = check_rel_se(rel_se)
    if max_probes < 1 or batch_probes < 1:
        raise QDeployError(f"probe counts must be >= 1 (max_probes={max_probes}, batch_probes={batch_probes})")
    loss_fn = loss_fn or nn.functional.cross_entropy
    mods = dict(model.named_modules())
    layers = resolve_trace_layers(model, mods, layers)
    batches = trace_batches(data, model_dtype(model))
    ps_ok, ps_why = per_sample_supported(mods, layers, model, batches[0][0]) if estimator != "joint" else (False, "")
    if estimator == "per_sample" and not ps_ok:
        raise QDeployError(f"estimator='per_sample': {ps_why}; use estimator='joint' (or 'auto')")
    est = "per_sample" if estimator == "per_sample" or (estimator == "auto" and hvp is None and ps_ok) else "joint"
    if blockwise is None:
        blockwise = est == "per_sample"
    hvp = hvp or "autograd"
    if hvp == "autograd":
        vectorize = False
    if activations is True:
        act_names = list(layers[1:])
    elif activations:
        act_names = list(activations)
    else:
        act_names = []
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
        gen = torch.Generator().manual_seed(int(seed))
        names = list(wkeys) + [f"act:{n}" for n in act_names]
        if est == "per_sample":
            step = PerSamplePasses(model, mods, layers, act_names, batches, loss_fn, blockwise, gen).run
            hooks = []
        else:
            step, hooks = _joint_engine(model, mods, params, buffers, w0, act_names, batches, act_shapes, loss_fn,
                                        hvp, blockwise, vectorize, gen, total_n)
        samples: dict[str, list[float]] = {k: [] for k in names}
        means_prev = None
        converged = False
        done = 0
        try:
            while done < max_probes:
                k = min(batch_probes, max_probes - done)
                acc = step(k)
                for kk in names:
                    samples[kk].extend(float(t) for t in acc[kk])
                done += k
                if progress is not None:
                    progress(done)
                means = {kk: float(np.mean(samples[kk])) for kk in names}
                if done >= min_probes and _stop(samples, means, means_prev, tol, rel_se):
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
                       converged=converged, estimator=est)


def _stop(samples: dict, means: dict, means_prev: dict | None, tol: float, rel_se: float | None) -> bool:
    """Early stop: every running mean moved by <= tol (relative) since the last chunk (PyHessian's
    rule, per tensor), or, with ``rel_se``, every standard error is <= rel_se x |mean|."""
    if means_prev is not None and all(abs(means[k] - means_prev[k]) <= tol * (abs(means_prev[k]) + 1e-12)
                                      for k in means):
        return True
    if rel_se is not None:
        return all(len(v) > 1 and np.std(v, ddof=1) / math.sqrt(len(v)) <= rel_se * abs(means[k])
                   for k, v in samples.items())
    return False


def _joint_engine(model, mods, params, buffers, w0, act_names, batches, act_shapes, loss_fn, hvp, blockwise,
                  vectorize, gen, total_n):
    """The joint (PyHessian-style) estimator: ``(step, hooks)`` with ``step(k)`` -> {key: (k,) tensor}
    of k probes, and the activation-perturbation hooks to remove afterwards."""
    from torch.func import functional_call, grad, jvp, vjp, vmap

    wkeys = list(w0)
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
    try:
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
    except BaseException:
        for h in hooks:
            h.remove()
        raise

    def step(k):
        vw = {kk: rademacher((k, *w0[kk].shape), gen) for kk in wkeys}
        ve_b = [{n: rademacher((k, *s[n]), gen) for n in act_names} for s in act_shapes]
        acc = None
        for (x, y), ve, vjp_fn in zip(batches, ve_b, lin):
            if blockwise:
                vals = _blockwise(vjp_fn, vw, ve, vectorize, vmap)
            else:
                vals = _joint(vjp_fn, vw, ve, vectorize, vmap)
            wgt = x.shape[0] / total_n
            vals = {kk: vv * wgt for kk, vv in vals.items()}
            acc = vals if acc is None else {kk: acc[kk] + vals[kk] for kk in acc}
        return acc
    return step, hooks


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


def rademacher(shape, gen) -> torch.Tensor:
    """Float32 tensor of ``shape`` with independent entries +-1 (equal odds), drawn from the
    ``torch.Generator`` ``gen`` (Hutchinson's probe vectors)."""
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

