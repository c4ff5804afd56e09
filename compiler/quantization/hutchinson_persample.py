"""Hutchinson traces with one probe per *sample* (the ``estimator="per_sample"`` of
:func:`~.hutchinson.hutchinson_traces`).

The loss is a mean over N samples, so its Hessian block of layer i is a mean of per-sample blocks,
H_ii = (1/N) sum_n H_ii^(n), and Hutchinson's identity (Hutchinson 1990; E[v v^T] = I) holds per
sample.  One *pass* draws an independent probe V_n for every sample n and layer i and returns

    r_i = (1/N) sum_n sum_j  V_{n,i}^T H_ij^(n) V_{n,j},      E[r_i] = Tr(H_ii)

(the cross terms j != i have zero mean, as with PyHessian's joint probe; ``blockwise`` drops them).
Per-sample Hessians of a classifier have rank <= classes, so the N independent terms average out
most of the variance of one joint probe v^T H v: on the benchmark nets one pass has a 4-26 %
relative standard deviation where one joint probe has about 100 % (``benchmarks/hessian_trace.py``).

Probes are Kronecker products of Rademacher vectors, V_{n,i} = a_n (x) b_n (a_n over output
channels, b_n over the input fan-in: in_features, or in_channels/groups x kernel), still +-1 with
E[vec(V) vec(V)^T] = I (Bujanovic & Kressner, "Norm and trace estimation with random rank-one
vectors", SIAM J. Matrix Anal. Appl. 42(1), 2021).  They make each pass cheap: the effect of
the per-sample weight perturbation t_i V_{n,i} on layer i's output is a_n (b_n . x_n) (Linear) or
a_n times a one-channel correlation of the unfolded input with b_n (Conv), added by a forward hook
scaled by a scalar t_i; r is the Hessian of the loss w.r.t. t (one entry per layer) applied to the
all-ones vector, by double backward (PyHessian's HVP, Yao et al. arXiv 1912.07145, on L scalars).
Activation traces (HAWQ-V2 Sec. 3.3) use a full Rademacher probe U of each traced layer input,
added as s_a U by a forward pre-hook, as the joint estimator does.

Supported layers: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` (exact types, integer padding, zero
padding mode); :func:`per_sample_supported` says why another model is not.
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
MAX_ELEMS = 1 << 22  # float entries of the largest per-sample temporary (unfolded input) x samples per forward: 16 MiB


def per_sample_supported(mods: dict, layers: Sequence[str]) -> tuple[bool, str]:
    """``(True, "")`` when every layer is a plain ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` with
    integer padding and zero padding mode, else ``(False, why)`` naming the first other layer."""
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
    ``gen`` (``randint`` over [0, 2**62) keeps 62 uniform independent low bits), unpacked."""
    n = int(np.prod(shape))
    words = torch.randint(0, 1 << 62, ((n + 61) // 62,), generator=gen, dtype=torch.int64)
    bits = (words.unsqueeze(1) >> _BITS).bitwise_and_(1).reshape(-1)[:n]
    return bits.reshape(shape).to(torch.float32).mul_(2).sub_(1)


def conv_patches(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, C_in, *S) -> (N, groups, C_in/groups * prod(kernel), L) patches of ``m``'s convolution, in
    the weight's (channel, kernel...) order: a depthwise convolution of ``x`` with one-hot kernels
    (same stride, padding, dilation), whose backward is again a convolution (``nn.functional.unfold``
    and strided slices were far slower on CPU, in the double backward most of all)."""
    ks = tuple(m.kernel_size)
    k = int(np.prod(ks))
    c = x.shape[1]
    eye = torch.eye(k, dtype=x.dtype).reshape(k, 1, *ks).repeat(c, 1, *([1] * len(ks)))  # (C*K, 1, *ks)
    conv = nn.functional.conv1d if isinstance(m, nn.Conv1d) else nn.functional.conv2d
    u = conv(x, eye, None, m.stride, m.padding, m.dilation, c)  # (N, C*K, *out): channel c*K + k
    return u.reshape(x.shape[0], m.groups, -1, int(np.prod(u.shape[2:])))


def _perturbation(m: nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out_shape) -> torch.Tensor:
    """Output of weights V_n = a_n (x) b_n (no bias) on input x_n, per sample: shaped like the layer output."""
    n = x.shape[0]
    if isinstance(m, nn.Linear):
        s = (x * b.reshape(n, *([1] * (x.dim() - 2)), -1)).sum(-1, keepdim=True)  # (N, ..., 1)
        return s * a.reshape(n, *([1] * (x.dim() - 2)), -1)
    u = conv_patches(m, x)  # (N, G, K, L)
    s = torch.einsum("nk,ngkl->ngl", b, u)  # (N, G, L): b spans one group's (C_in/groups, kernel) block
    s = s.repeat_interleave(m.out_channels // m.groups, dim=1)  # (N, C_out, L): each channel's group
    return (s * a.unsqueeze(-1)).reshape(out_shape)


class PerSamplePasses:
    """Draws and evaluates passes of per-sample probes; :meth:`run` returns ``{key: (k,) array}`` for
    ``k`` passes, keys ``"<layer>.weight"`` and ``"act:<layer>"`` (as the joint estimator's).

    Args:
        model: in eval mode (the caller's job); its parameters' ``requires_grad`` is switched off
            during a pass and restored.
        mods: ``dict(model.named_modules())``.  layers: weight layer names (supported, see
            :func:`per_sample_supported`).  act_names: layers whose input activation is traced.
        batches: ``[(x, y)]``; the loss is the sample-weighted mean over all batches.
        loss_fn: ``loss_fn(logits, y)``, the mean over the batch.
        blockwise: r_i = d^2 L / d t_i^2 (no cross terms; one backward per traced tensor) instead of
            the row sum of the t-Hessian.
        gen: the ``torch.Generator`` of the probes.  Probes are drawn per pass for all samples in
            one order (layers, then activations), so splitting the data into batches does not change
            them.

    When the data is small (``MAX_ELEMS`` bounds the largest temporary), several passes run in one
    forward with the data repeated and each copy its own t (the loss is separable over samples, so
    the t-Hessian is block-diagonal over the copies); else one pass runs in chunks of samples.
    """

    def __init__(self, model: nn.Module, mods: dict, layers: Sequence[str], act_names: Sequence[str], batches,
                 loss_fn: Callable, blockwise: bool, gen: torch.Generator):
        self.model, self.mods, self.layers, self.acts = model, mods, list(layers), list(act_names)
        self.loss_fn, self.blockwise, self.gen = loss_fn, blockwise, gen
        self.total = sum(int(x.shape[0]) for x, _ in batches)
        # split batches into chunks whose largest temporary stays under MAX_ELEMS floats
        per = 1
        for x, _ in batches[:1]:
            ins = layer_inputs(model, x[:1], self.layers)
            for nme in self.layers:
                m = mods[nme]
                per = max(per, int(np.prod(conv_patches(m, ins[nme]).shape)) if not isinstance(m, nn.Linear)
                          else int(ins[nme].numel()))
        step = max(1, MAX_ELEMS // per)  # samples per forward
        if self.total <= step:  # small data: all of it in one forward, several passes stacked (one graph)
            self.chunks = [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]
            self.stack = max(1, step // self.total)
        else:  # one pass at a time, in chunks
            self.chunks = [(x[i:i + step], y[i:i + step]) for x, y in batches for i in range(0, int(x.shape[0]), step)]
            self.stack = 1
        self.act_shapes = {}
        if self.acts:
            ins = layer_inputs(model, self.chunks[0][0][:1], self.acts)
            self.act_shapes = {n: tuple(ins[n].shape[1:]) for n in self.acts}
        self.keys = [f"{n}.weight" for n in self.layers] + [f"act:{n}" for n in self.acts]

    def _draw(self):
        n = self.total
        w = []
        for nme in self.layers:
            m = self.mods[nme]
            fan_in = m.in_features if isinstance(m, nn.Linear) else int(np.prod(m.weight.shape[1:]))
            cout = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            w.append((rademacher((n, cout), self.gen), rademacher((n, fan_in), self.gen)))
        u = [rademacher((n, *self.act_shapes[a]), self.gen) for a in self.acts]
        return w, u

    def _forward(self, x, y, draws, sl: slice, weight: float) -> torch.Tensor:
        """(R, K) float64: for each of the R passes in ``draws``, the t-Hessian row sums (or diagonal)
        of ``weight`` x the mean loss on samples ``sl`` (the R passes stacked along the batch)."""
        nl, k, r = len(self.layers), len(self.keys), len(draws)
        c = int(x.shape[0])
        if r > 1:
            x = x.repeat(r, *([1] * (x.dim() - 1)))
            y = y.repeat(r, *([1] * (y.dim() - 1)))
        t = torch.zeros(r, k, requires_grad=True)

        def scale(i, like):  # each sample's t of its pass, shaped to broadcast over ``like``
            return t[:, i].repeat_interleave(c).reshape(-1, *([1] * (like.dim() - 1)))

        hooks = []
        for i, nme in enumerate(self.layers):
            a = torch.cat([d[0][i][0][sl] for d in draws])
            b = torch.cat([d[0][i][1][sl] for d in draws])
            hooks.append(self.mods[nme].register_forward_hook(
                lambda mod, inp, out, i=i, a=a, b=b: out + scale(i, out) * _perturbation(mod, inp[0], a, b, out.shape)))
        for j, nme in enumerate(self.acts):
            uu = torch.cat([d[1][j][sl] for d in draws])
            hooks.append(self.mods[nme].register_forward_pre_hook(
                lambda mod, inp, j=j, uu=uu: (inp[0] + scale(nl + j, uu) * uu,) + tuple(inp[1:])))
        try:
            with torch.enable_grad():
                # the mean over r x c samples is (1/r) sum of the r passes' losses: times r
                loss = self.loss_fn(logits(self.model(x)), y) * (weight * r)
                (g,) = torch.autograd.grad(loss, t, create_graph=True)
                if self.blockwise:
                    h = torch.stack([_diag(g[:, i].sum(), t, i, retain=i < k - 1) for i in range(k)], dim=1)
                else:
                    (h,) = torch.autograd.grad(g.sum(), t)
        finally:
            for hk in hooks:
                hk.remove()
        return h.detach().to(torch.float64)

    def _passes(self, r: int) -> np.ndarray:
        """(r, K): r passes, stacked in one forward when the data is small, else one pass in chunks."""
        draws = [self._draw() for _ in range(r)]
        if len(self.chunks) == 1:
            x, y = self.chunks[0]
            return self._forward(x, y, draws, slice(0, self.total), 1.0).numpy()
        out = torch.zeros(r, len(self.keys), dtype=torch.float64)
        for q, d in enumerate(draws):
            start = 0
            for x, y in self.chunks:
                c = int(x.shape[0])
                out[q] += self._forward(x, y, [d], slice(start, start + c), c / self.total)[0]
                start += c
        return out.numpy()

    def run(self, k: int) -> dict[str, np.ndarray]:
        """``k`` passes: ``{key: (k,) float64 array}``."""
        req = {p: p.requires_grad for p in self.model.parameters()}
        for p in req:
            p.requires_grad_(False)
        try:
            rows, done = [], 0
            while done < k:
                r = min(int(k) - done, self.stack)
                rows.append(self._passes(r))
                done += r
            rows = np.concatenate(rows)
        finally:
            for p, f in req.items():
                p.requires_grad_(f)
        return {key: rows[:, i] for i, key in enumerate(self.keys)}


def _diag(gi: torch.Tensor, t: torch.Tensor, i: int, retain: bool) -> torch.Tensor:
    """d gi / d t[:, i] for the (R, K) tensor t: shape (R,) (zeros when gi does not depend on t)."""
    if not gi.requires_grad:
        return torch.zeros(t.shape[0], dtype=t.dtype)
    (d,) = torch.autograd.grad(gi, t, retain_graph=retain, allow_unused=True)
    return torch.zeros(t.shape[0], dtype=t.dtype) if d is None else d[:, i]


def check_rel_se(rel_se) -> float | None:
    """``rel_se`` as a float in (0, 1), or None (off).  Raises QDeployError otherwise."""
    if rel_se is None:
        return None
    v = float(rel_se)
    if not (math.isfinite(v) and 0.0 < v < 1.0):
        raise QDeployError(f"rel_se must be a number in (0, 1) (relative standard error), got {rel_se}")
    return v
