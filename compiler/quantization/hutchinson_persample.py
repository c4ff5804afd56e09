"""Hutchinson traces with one probe per *sample* (the ``estimator="per_sample"`` of
:func:`~.hutchinson.hutchinson_traces`).

The loss is a mean over N samples, so its Hessian block of layer i is a mean of per-sample blocks,
H_ii = (1/N) sum_n H_ii^(n), and Hutchinson's identity (Hutchinson 1990; E[v v^T] = I) holds per
sample.  One *pass* draws an independent probe V_{n,i} for every sample n and layer i.  Probes are
Kronecker products of Rademacher vectors, V_{n,i} = a_n (x) b_n (a_n over output channels, b_n over
the input fan-in: in_features, or in_channels/groups x kernel), still +-1 with
E[vec(V) vec(V)^T] = I (Bujanovic & Kressner, "Norm and trace estimation with random rank-one
vectors", SIAM J. Matrix Anal. Appl. 42(1), 2021).

Layer i's output z_i is linear in its weight, so the weight perturbation V_{n,i} moves sample n's
output by d_{n,i} = V_{n,i} x_{n,i} (x the layer input; a_n (b_n . x_n) for Linear, a_n times a
one-channel correlation of the unfolded input with b_n for Conv), and

    V_{n,i}^T H_ii^(n) V_{n,i} = d_{n,i}^T (d^2 l_n / d z_i^2) d_{n,i}

exactly (the second derivative of z_i in W_i is zero).  For a Linear layer with one input vector per
sample (2-D input) the per-sample block factorizes, H_ii^(n) = x_n x_n^T (x) d^2 l_n / d z_i^2, so
the input-side factor is integrated out exactly, E_b[(b_n . x_n)^2] = ||x_n||^2: there
d_{n,i} = a_n ||x_n|| (Hutchinson over the outputs only; still unbiased, with less variance and no b
to draw).  Every pass is then Hessian-vector products in the space of the layer *outputs*: zero
leaves P_i are added to each traced layer's output (a forward hook), the gradient G = dL/dP of the
mean loss L is built once with ``create_graph=True`` (one forward and backward over the data for the
whole run), and a product is one backward through that gradient graph, H_PP d = d(G . d)/dP
(PyHessian's double-backward HVP, Yao et al. arXiv 1912.07145, but on the outputs, so no
weight-gradient products are formed).  Per layer, ``blockwise`` (the default):

    r_i = <d_i, H_{z_i z_i} d_i> = (1/N) sum_n d_{n,i}^T H^(n)_{z_i z_i} d_{n,i},   E[r_i] = Tr(H_ii)

one product per traced tensor, from G_i to P_i alone (autograd walks only the layers from i on);
or, ``blockwise=False``, one product per pass with the joint d, r_i = <d_i, (H_PP d)_i>, which adds the
terms d_i^T H_{z_i z_j} d_j (j != i) of zero mean (the a_n of different layers are independent): on the
benchmark nets it costs about as much per pass and needs far more passes.  Per-sample Hessians of a
classifier have rank <= classes, so the N independent terms average out most of the variance of one
joint probe v^T H v: on the benchmark nets (``benchmarks/hessian_trace.py``, 1024 samples) one
blockwise pass has a 2-5 % relative standard deviation per layer where one PyHessian probe has
20-180 %.  Activation traces (HAWQ-V2 Sec. 3.3) add a zero leaf Q_a to each traced layer input (a
forward pre-hook) and use a full Rademacher probe U of it, r_a = <U, H_QQ U> (or <U, (H d)_Q>).
Probes are drawn from numpy's PCG64 (seeded from the caller's ``torch.Generator``): 8 probe entries
per random byte.

Supported layers: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` (exact types, integer padding, zero
padding mode); :func:`per_sample_supported` says why another model is not.  Samples must not
interact (eval mode: batch-norm uses running statistics), as for any per-sample loss.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import QDeployError
from .hessian import layer_inputs, logits

__all__ = ["per_sample_supported", "PerSamplePasses", "conv_patches", "rademacher", "check_rel_se", "MAX_ELEMS"]

_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
MAX_ELEMS = 1 << 22  # float entries of the largest per-sample temporary (unfolded input) x samples per graph: 16 MiB
MAX_STACK = 8  # passes stacked side by side in one gradient graph (small data)


def per_sample_supported(mods: dict, layers: Sequence[str], model: nn.Module | None = None,
                         x: torch.Tensor | None = None) -> tuple[bool, str]:
    """``(True, "")`` when every layer is a plain ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` with
    integer padding and zero padding mode, and (given ``model`` and an input batch ``x``) runs once per
    forward (a layer called twice shares its weight between two outputs, which the per-output leaves
    do not model); else ``(False, why)`` naming the first other layer."""
    if model is not None and x is not None:
        calls = {n: 0 for n in layers}
        hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: calls.__setitem__(n, calls[n] + 1))
                 for n in layers]
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(x[:1])
        finally:
            model.train(was)
            for h in hooks:
                h.remove()
        for n, c in calls.items():
            if c != 1:
                return False, f"layer {n!r} runs {c} times per forward (shared weights)"
    for n in layers:
        m = mods[n]
        if type(m) not in _TYPES:
            return False, f"layer {n!r} is a {type(m).__name__}, not a plain Linear/Conv1d/Conv2d"
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) and (isinstance(m.padding, str) or m.padding_mode != "zeros"):
            return False, f"conv layer {n!r} has padding {m.padding!r} / mode {m.padding_mode!r} (integer zero padding only)"
    return True, ""


_BITS = torch.arange(62, dtype=torch.int64)


def rademacher(shape, gen) -> torch.Tensor:
    """Float32 tensor of ``shape`` with independent +-1 entries: 62 random bits per draw of
    ``gen`` (a ``torch.Generator``; ``randint`` over [0, 2**62) keeps 62 uniform independent low
    bits), unpacked."""
    n = int(np.prod(shape))
    words = torch.randint(0, 1 << 62, ((n + 61) // 62,), generator=gen, dtype=torch.int64)
    bits = (words.unsqueeze(1) >> _BITS).bitwise_and_(1).reshape(-1)[:n]
    return bits.reshape(shape).to(torch.float32).mul_(2).sub_(1)


_SIGN_TABLE = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(np.float32) * 2 - 1  # (256, 8)


def _signs(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n,) float32 of independent +-1 from ``rng``'s random bytes: each byte's 8 bits, looked up
    in a (256, 8) table of signs (one pass)."""
    by = np.frombuffer(rng.bytes((n + 7) // 8), dtype=np.uint8)
    return np.take(_SIGN_TABLE, by, axis=0).reshape(-1)[:n]


def conv_patches(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, C_in, *S) -> (N, groups, C_in/groups * prod(kernel), L) patches of ``m``'s convolution, in
    the weight's (channel, kernel...) order: a depthwise convolution of ``x`` with one-hot kernels
    (same stride, padding, dilation; ``nn.functional.unfold`` was slower on CPU)."""
    ks = tuple(m.kernel_size)
    k = int(np.prod(ks))
    c = x.shape[1]
    eye = torch.eye(k, dtype=x.dtype).reshape(k, 1, *ks).repeat(c, 1, *([1] * len(ks)))  # (C*K, 1, *ks)
    conv = nn.functional.conv1d if isinstance(m, nn.Conv1d) else nn.functional.conv2d
    u = conv(x, eye, None, m.stride, m.padding, m.dilation, c)  # (N, C*K, *out): channel c*K + k
    return u.reshape(x.shape[0], m.groups, -1, int(np.prod(u.shape[2:])))


def _perturbation(m: nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out_shape) -> torch.Tensor:
    """Output of weights V_n = a_n (x) b_n (no bias) on input x_n, per sample: shaped like the layer
    output.  ``x``: the layer input (Linear) or its :func:`conv_patches` (Conv); for a Linear layer
    with 2-D input, the (N, 1) norms ||x_n|| (``b`` empty): a_n ||x_n||, b integrated out."""
    n = x.shape[0]
    if isinstance(m, nn.Linear) and b.shape[-1] == 0:
        return a * x
    if isinstance(m, nn.Linear):
        s = (x * b.reshape(n, *([1] * (x.dim() - 2)), -1)).sum(-1, keepdim=True)  # (N, ..., 1)
        return s * a.reshape(n, *([1] * (x.dim() - 2)), -1)
    s = torch.einsum("nk,ngkl->ngl", b, x)  # (N, G, L): b spans one group's (C_in/groups, kernel) block
    s = s.repeat_interleave(m.out_channels // m.groups, dim=1)  # (N, C_out, L): each channel's group
    return (s * a.unsqueeze(-1)).reshape(out_shape)


def _layer_input(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What :func:`_perturbation` needs of layer ``m``'s input ``x``: the (N, 1) norms for a Linear
    layer with 2-D input, ``x`` for another Linear, the :func:`conv_patches` for Conv."""
    if isinstance(m, nn.Linear):
        return torch.linalg.vector_norm(x, dim=1, keepdim=True) if x.dim() == 2 else x
    return conv_patches(m, x)


class _Graph:
    """The gradient graph of one chunk of samples: zero leaves at the traced layers' outputs (and
    traced inputs), G = d(weight x mean loss)/d(leaves) with ``create_graph=True``, and each traced
    layer's input (its conv patches for Conv), detached."""

    def __init__(self, owner: "PerSamplePasses", x: torch.Tensor, y: torch.Tensor, weight: float, rep: int):
        mods, leaves, ins, hooks = owner.mods, {}, {}, []
        self.n, self.rep = int(x.shape[0]), rep
        if rep > 1:  # rep passes side by side: the loss is separable over samples, so the
            # Hessian of the stacked loss is block-diagonal over the copies
            x = x.repeat(rep, *([1] * (x.dim() - 1)))
            y = y.repeat(rep, *([1] * (y.dim() - 1)))

        def post(mod, inp, out, n):
            ins[n] = inp[0].detach()
            leaves[n] = torch.zeros_like(out, requires_grad=True)
            return out + leaves[n]

        def pre(mod, inp, n):
            leaves["act:" + n] = torch.zeros_like(inp[0], requires_grad=True)
            return (inp[0] + leaves["act:" + n],) + tuple(inp[1:])

        for n in owner.layers:
            hooks.append(mods[n].register_forward_hook(lambda m, i, o, n=n: post(m, i, o, n)))
        for n in owner.acts:
            hooks.append(mods[n].register_forward_pre_hook(lambda m, i, n=n: pre(m, i, n)))
        try:
            with torch.enable_grad():
                # the mean over rep x n samples is (1/rep) x the sum of the copies' means: times rep
                loss = owner.loss_fn(logits(owner.model(x)), y) * (weight * rep)
                self.leaves = [leaves[n] for n in owner.layers] + [leaves["act:" + n] for n in owner.acts]
                grads = torch.autograd.grad(loss, self.leaves, create_graph=True, allow_unused=True)
        finally:
            for h in hooks:
                h.remove()
        # leaves the loss does not reach, or reaches only linearly, have a zero Hessian row
        self.live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self.grads = [grads[i] for i in self.live]
        self.inputs = [_layer_input(mods[n], ins[n]) for n in owner.layers]

    def passes(self, owner: "PerSamplePasses", w, u, start: int, keep: bool) -> np.ndarray:
        """(R, K) float64: r of the R passes stacked in this graph (``self.rep`` copies of the chunk,
        samples ``start:start+n`` of the data), probes ``w`` = [(a, b)] per layer and ``u`` per
        activation, each shaped (R, N_total, ...)."""
        sl = slice(start, start + self.n)
        r = self.rep

        def cut(t):  # (R, N_total, ...) -> (R * n, ...): this chunk's samples, passes stacked
            return t[:, sl].reshape(r * self.n, *t.shape[2:])

        d = [_perturbation(owner.mods[nme], h, cut(a).to(h.dtype), cut(b).to(h.dtype), leaf.shape)
             for nme, h, (a, b), leaf in zip(owner.layers, self.inputs, w, self.leaves)]
        d += [cut(uu).to(leaf.dtype) for uu, leaf in zip(u, self.leaves[len(owner.layers):])]
        if not owner.blockwise:
            return self._hvp_dot(d, keep)
        out = np.zeros((r, len(self.leaves)))
        for i in self.live:
            out[:, i] = self._hvp_dot(d, keep or i != self.live[-1], only=i)[:, i]
        return out

    def _hvp_dot(self, d, retain: bool, only: int | None = None) -> np.ndarray:
        """(R, K): per stacked pass, <d_i, (H d)_i> for every leaf i; or, with ``only``, the
        diagonal term <d_i, H_ii d_i> of leaf i = ``only`` in column i (a backward from G_i to P_i
        alone: autograd walks only the graph between them, the layers from i on)."""
        r = self.rep
        out = np.zeros((r, len(self.leaves)))
        if only is not None:
            if only not in self.live:
                return out
            (h,) = torch.autograd.grad(self.grads[self.live.index(only)], self.leaves[only], grad_outputs=d[only],
                                       retain_graph=retain, allow_unused=True)
            hv = [None] * len(self.leaves)
            hv[only] = h
        elif self.grads:
            hv = torch.autograd.grad(self.grads, self.leaves, grad_outputs=[d[i] for i in self.live],
                                     retain_graph=retain, allow_unused=True)
        else:
            return out
        for i, (di, h) in enumerate(zip(d, hv)):
            if h is not None:
                out[:, i] = (di.reshape(r, -1) * h.reshape(r, -1)).sum(1).to(torch.float64).numpy()
        return out


class PerSamplePasses:
    """Draws and evaluates passes of per-sample probes; :meth:`run` returns ``{key: (k,) array}`` for
    ``k`` passes, keys ``"<layer>.weight"`` and ``"act:<layer>"`` (as the joint estimator's).

    Args:
        model: in eval mode (the caller's job); its parameters' ``requires_grad`` is switched off
            while the estimator runs and restored.
        mods: ``dict(model.named_modules())``.  layers: weight layer names (supported, see
            :func:`per_sample_supported`).  act_names: layers whose input activation is traced.
        batches: ``[(x, y)]``; the loss is the sample-weighted mean over all batches.
        loss_fn: ``loss_fn(logits, y)``, the mean over the batch.
        blockwise: r_i = <d_i, H d_i> (no cross terms; one HVP per traced tensor and pass, each
            through the graph from that tensor on) instead of <d_i, (H d)_i> with the joint
            per-sample probe d (one HVP per pass).
        gen: a ``torch.Generator``; one draw of it seeds the numpy PCG64 generator of the probes.
            Probes are drawn per pass for all samples in one order (layers, then activations), so
            splitting the data into batches does not change them.

    The data is split into chunks whose largest temporary (a layer input, or a Conv layer's unfolded
    input) stays under ``MAX_ELEMS`` floats.  When it is one chunk, its gradient graph is built once,
    over up to ``MAX_STACK`` copies of the data side by side (one pass each: the loss is separable
    over samples, so the Hessian is block-diagonal over the copies), and every group of passes is
    one backward per product through it; else each pass rebuilds the graph chunk by chunk.  Passes
    computed ahead are kept for the next :meth:`run`.
    """

    def __init__(self, model: nn.Module, mods: dict, layers: Sequence[str], act_names: Sequence[str], batches,
                 loss_fn: Callable, blockwise: bool, gen: torch.Generator):
        self.model, self.mods, self.layers, self.acts = model, mods, list(layers), list(act_names)
        self.loss_fn, self.blockwise = loss_fn, blockwise
        self.rng = np.random.default_rng(int(torch.randint(0, 1 << 62, (1,), generator=gen, dtype=torch.int64)))
        self.total = sum(int(x.shape[0]) for x, _ in batches)
        per = 1
        for x, _ in batches[:1]:
            ins = layer_inputs(model, x[:1], self.layers)
            for nme in self.layers:
                m = mods[nme]
                per = max(per, int(np.prod(conv_patches(m, ins[nme]).shape)) if not isinstance(m, nn.Linear)
                          else int(ins[nme].numel()))
            self.flat = {nme for nme in self.layers if isinstance(mods[nme], nn.Linear) and ins[nme].dim() == 2}
        step = max(1, MAX_ELEMS // per)  # samples per graph
        if self.total <= step:  # one chunk: its graph is built once, with passes stacked side by side
            self.chunks = [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]
            self.rep = max(1, min(MAX_STACK, step // self.total))
        else:
            self.chunks = [(x[i:i + step], y[i:i + step]) for x, y in batches for i in range(0, int(x.shape[0]), step)]
            self.rep = 1
        self.graph = None  # the one chunk's graph, built on the first pass
        self.spare = np.zeros((0, len(layers) + len(self.acts)))  # passes computed ahead (stacking), not yet returned
        self.act_shapes = {}
        if self.acts:
            ins = layer_inputs(model, self.chunks[0][0][:1], self.acts)
            self.act_shapes = {n: tuple(ins[n].shape[1:]) for n in self.acts}
        self.keys = [f"{n}.weight" for n in self.layers] + [f"act:{n}" for n in self.acts]

    def _draw(self, r: int):
        """Probes of ``r`` passes: ([(a, b)] per layer, [U] per activation), each (r, N_total, ...),
        from one block of random bytes."""
        n = self.total
        sizes = []
        for nme in self.layers:
            m = self.mods[nme]
            fan_in = 0 if nme in self.flat else int(np.prod(m.weight.shape[1:]))  # no b: integrated out
            cout = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            sizes.append((cout, fan_in))
        acts = [int(np.prod(self.act_shapes[a])) for a in self.acts]
        per = sum(c + f for c, f in sizes) + sum(acts)
        flat = torch.from_numpy(_signs(self.rng, r * n * per)).reshape(r, n, per)
        w, at = [], 0
        for c, f in sizes:
            w.append((flat[:, :, at:at + c], flat[:, :, at + c:at + c + f]))
            at += c + f
        u = []
        for a, sz in zip(self.acts, acts):
            u.append(flat[:, :, at:at + sz].reshape(r, n, *self.act_shapes[a]))
            at += sz
        return w, u

    def _passes(self) -> np.ndarray:
        """(rep, K): the next ``rep`` passes (one backward through the built graph when the data
        is one chunk; else one pass, its graph rebuilt chunk by chunk)."""
        w, u = self._draw(self.rep)
        if len(self.chunks) == 1:
            if self.graph is None:
                x, y = self.chunks[0]
                self.graph = _Graph(self, x, y, 1.0, self.rep)
            return self.graph.passes(self, w, u, 0, keep=True)
        out = np.zeros((1, len(self.keys)))
        start = 0
        for x, y in self.chunks:
            c = int(x.shape[0])
            out += _Graph(self, x, y, c / self.total, 1).passes(self, w, u, start, keep=False)
            start += c
        return out

    def run(self, k: int) -> dict[str, np.ndarray]:
        """``k`` passes: ``{key: (k,) float64 array}``."""
        req = {p: p.requires_grad for p in self.model.parameters()}
        for p in req:
            p.requires_grad_(False)
        try:
            rows = [self.spare]
            have = len(self.spare)
            while have < k:
                rows.append(self._passes())
                have += len(rows[-1])
            rows = np.concatenate(rows)
            rows, self.spare = rows[:k], rows[k:]
        finally:
            for p, f in req.items():
                p.requires_grad_(f)
        return {key: rows[:, i] for i, key in enumerate(self.keys)}


def check_rel_se(rel_se) -> float | None:
    """``rel_se`` as a float in (0, 1), or None (off).  Raises QDeployError otherwise."""
    if rel_se is None:
        return None
    v = float(rel_se)
    if not (math.isfinite(v) and 0.0 < v < 1.0):
        raise QDeployError(f"rel_se must be a number in (0, 1) (relative standard error), got {rel_se}")
    return v
