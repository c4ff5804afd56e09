"""Quantization sensitivities Omega_i(b) from Hessian traces (HAWQ-V3, Yao et al., arXiv 2011.10680, Eq. 10).

    Omega_i(b) = Tr(H_i) / n_i * || Q_b(W_i) - W_i ||_2^2

is a second-order estimate (up to a factor 1/2) of the loss increase when layer i's weights are
quantized to b bits.  The same form is used for a layer's input activation a_i (HAWQ-V2,
arXiv 1911.03852, Sec. 3.3), with the Hessian of the mean loss over N samples taken with respect to
the activation entries and the error summed over those samples.

The quantizers here are the ones the QAT models use (:mod:`.qat`), so the estimate describes what
will be deployed:

* weights: signed, narrow range (codes -(2^(b-1)-1) .. 2^(b-1)-1), per-tensor, power-of-two scale
  s = 2^ceil(log2(max|W| / 2^(b-1))) (Brevitas ``Int8WeightPerTensorFixedPoint``: max statistics
  over the power-of-two integer scaling 2^(b-1), scale restricted to a power of two by ceil);
* activations: unsigned (after ReLU) or signed, per-tensor, the power-of-two scale with the least
  squared error (Brevitas learns the activation scale during QAT; this picks its best PoT value).

The second-order model holds for small perturbations only.  :func:`measured_loss_increase` measures
the loss increase Delta L_i(b) of quantizing ONE tensor to b bits (every other tensor in float) with
the same quantizers, one forward pass per (tensor, b).  On the digits MLP (examples/digits/
search_recipe.py, search_report.md "Sensitivity per bit width") Omega and 2 Delta L agree within
1.21x at 3 bits and mostly within 4x at 4..8 bits (where both are below 0.1 and the measurement
is close to its noise), but at 2 bits (ternary weights) Omega under-estimates the MLP's first layer
14x (0.35 vs 4.9) and the CNN's last layer 13x (0.85 vs 11), which made the ILP pick such layers
at 2 bits.  The search's default ``sensitivity="hessian+measured"`` therefore uses
max(Omega_i(b), 2 Delta L_i(b)): the Hessian estimate wherever the measurement does not show it to
be an under-estimate (the factor 2 puts Delta L on Omega's scale, Omega ~= 2 Delta L).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from ..errors import QDeployError
from .hessian import logits

__all__ = ["check_bits", "weight_scale_exponent", "quantize_weight_pot", "quantize_act_pot", "weight_sensitivity",
           "act_sensitivity", "measured_loss_increase"]


def check_bits(bits: Iterable[int]) -> list[int]:
    """Candidate bit widths, checked: sorted and deduplicated integers in 2..32.

    Raises:
        QDeployError: an empty list or a width outside 2..32.
    """
    bits = [int(b) for b in bits]
    if not bits:
        raise QDeployError("the list of candidate bit widths is empty")
    bad = [b for b in bits if b < 2 or b > 32]
    if bad:
        raise QDeployError(f"candidate bit widths must be in 2..32, got {bad}")
    return sorted(set(bits))


def weight_scale_exponent(w: torch.Tensor, bits: int) -> int:
    """Exponent e of the power-of-two weight scale 2^e that Brevitas' ``Int8WeightPerTensorFixedPoint``
    uses at ``bits`` bits: e = ceil(log2(max|w| / 2^(bits-1))).

    Brevitas divides the max-statistics threshold by ``PowerOfTwoIntScaling`` (2^(bits-1) for signed
    codes), restricts the scale to a power of two with a ceil, then clamps codes to the narrow range
    +-(2^(bits-1) - 1); so the largest weight may clip by up to one step.  (An earlier version divided
    by 2^(bits-1) - 1, which doubles the scale at 2..4 bits and made the low-bit sensitivities describe
    a coarser quantizer than the QAT model uses; ``test_weight_quantizer_matches_brevitas`` pins it.)
    Returns 0 for an all-zero tensor.
    """
    amax = float(w.detach().abs().max())
    return math.ceil(math.log2(amax / 2 ** (int(bits) - 1))) if amax > 0 else 0


def quantize_weight_pot(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantize ``w`` (any shape) exactly as the QAT layers do at ``bits`` bits: narrow signed
    codes -(2^(bits-1)-1) .. 2^(bits-1)-1 times the scale 2^:func:`weight_scale_exponent`.

    Returns a tensor of ``w``'s shape holding code * scale.
    """
    qmax = 2 ** (bits - 1) - 1
    if float(w.detach().abs().max()) == 0.0:
        return torch.zeros_like(w)
    s = 2.0 ** weight_scale_exponent(w, bits)
    return torch.clamp(torch.round(w / s), -qmax, qmax) * s


def quantize_act_pot(a: torch.Tensor, bits: int, signed: bool | None = None) -> tuple[torch.Tensor, float]:
    """Fake-quantize activation ``a`` with the power-of-two scale of least squared error.

    ``signed`` defaults to ``a.min() < 0``.  Candidate scales: 2^e for e from the no-clipping
    exponent down by 6.  Returns ``(a_q, scale)``.
    """
    a = a.detach()
    if signed is None:
        signed = bool(a.min() < 0)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    amax = float(a.abs().max())
    if amax == 0.0:
        return torch.zeros_like(a), 1.0
    e0 = math.ceil(math.log2(amax / hi))
    best = None
    for e in range(e0, e0 - 7, -1):
        s = 2.0 ** e
        q = torch.clamp(torch.round(a / s), lo, hi) * s
        err = float(((q - a) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, q, s)
    return best[1], best[2]


def weight_sensitivity(mean_trace: float, w: torch.Tensor, bits: Iterable[int]) -> dict[int, float]:
    """Omega(b) = mean_trace * ||Q_b(w) - w||^2 for each b (``mean_trace`` = Tr(H)/n, loss/weight^2).

    Raises:
        QDeployError: empty or out-of-range bit list.
    """
    return {b: float(mean_trace) * float(((quantize_weight_pot(w, b) - w.detach()) ** 2).sum())
            for b in check_bits(bits)}


def act_sensitivity(mean_trace: float, a: torch.Tensor, bits: Iterable[int],
                    signed: bool | None = None) -> dict[int, float]:
    """Omega(b) = mean_trace * ||Q_b(a) - a||^2 for activation samples ``a`` (N, ...), each b."""
    return {b: float(mean_trace) * float(((quantize_act_pot(a, b, signed)[0] - a.detach()) ** 2).sum())
            for b in check_bits(bits)}


@torch.no_grad()
def measured_loss_increase(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, layer: str,
                           bits: Iterable[int], what: str = "weight",
                           loss_fn=torch.nn.functional.cross_entropy) -> dict[int, float]:
    """Loss increase when only ``layer``'s weight (``what="weight"``) or input activation
    (``what="act"``) is fake-quantized to each of ``bits`` (the quantizers above), eval mode.

    Args:
        model: float model (restored unchanged afterwards).
        x: inputs, shape (N, ...) float32; y: integer labels, shape (N,).
        layer: module name (a Linear/Conv).
        bits: candidate widths.
    Returns:
        {b: L(quantized) - L(float)} (mean loss over the N samples, nats; may be slightly negative
        when quantization happens to help).
    Raises:
        QDeployError: empty/out-of-range bit list or unknown ``what``.
    """
    if what not in ("weight", "act"):
        raise QDeployError(f"measured_loss_increase: what must be 'weight' or 'act', got {what!r}")
    bits = check_bits(bits)
    mod = dict(model.named_modules())[layer]
    was = model.training
    model.eval()
    out: dict[int, float] = {}
    try:
        base = float(loss_fn(logits(model(x)), y))
        if what == "weight":
            w0 = mod.weight.detach().clone()
            try:
                for b in bits:
                    mod.weight.copy_(quantize_weight_pot(w0, b))
                    out[b] = float(loss_fn(logits(model(x)), y)) - base
            finally:
                mod.weight.copy_(w0)
        else:
            acts = {}
            h = mod.register_forward_pre_hook(lambda m, a: acts.__setitem__("a", a[0]))
            try:
                model(x)
            finally:
                h.remove()
            signed = bool(acts["a"].min() < 0)
            for b in bits:
                q = quantize_act_pot(acts["a"], b, signed)[0]
                h = mod.register_forward_pre_hook(lambda m, a, q=q: (q,) + tuple(a[1:]))
                try:
                    out[b] = float(loss_fn(logits(model(x)), y)) - base
                finally:
                    h.remove()
    finally:
        model.train(was)
    return out

