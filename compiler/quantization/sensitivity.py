"""Quantization sensitivities Omega_i(b) from Hessian traces (HAWQ-V3, Yao et al., arXiv 2011.10680, Eq. 10).

    Omega_i(b) = Tr(H_i) / n_i * || Q_b(W_i) - W_i ||_2^2

is a second-order estimate (up to a factor 1/2) of the loss increase when layer i's weights are
quantized to b bits.  The same form is used for a layer's input activation a_i (HAWQ-V2,
arXiv 1911.03852, Sec. 3.3), with the Hessian of the mean loss over N samples taken with respect to
the activation entries and the error summed over those samples.

The quantizers here are the ones the QAT models use (:mod:`.qat`), so the estimate describes what
will be deployed:

* weights: signed, narrow range (codes -(2^(b-1)-1) .. 2^(b-1)-1), per-tensor, power-of-two scale
  s = 2^ceil(log2(max|W| / (2^(b-1)-1))) (Brevitas ``Int8WeightPerTensorFixedPoint``: max
  statistics, scale restricted to a power of two by ceil);
* activations: unsigned (after ReLU) or signed, per-tensor, the power-of-two scale with the least
  squared error (Brevitas learns the activation scale during QAT; this picks its best PoT value).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from ..errors import QDeployError

__all__ = ["quantize_weight_pot", "quantize_act_pot", "weight_sensitivity", "act_sensitivity"]


def _check_bits(bits: Iterable[int]) -> list[int]:
    bits = [int(b) for b in bits]
    if not bits:
        raise QDeployError("the list of candidate bit widths is empty")
    bad = [b for b in bits if b < 2 or b > 32]
    if bad:
        raise QDeployError(f"candidate bit widths must be in 2..32, got {bad}")
    return sorted(set(bits))


def quantize_weight_pot(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantize ``w`` (any shape) to ``bits``-bit narrow signed codes with a PoT scale.

    Returns a tensor of ``w``'s shape holding code * scale.
    """
    qmax = 2 ** (bits - 1) - 1
    amax = float(w.detach().abs().max())
    if amax == 0.0:
        return torch.zeros_like(w)
    s = 2.0 ** math.ceil(math.log2(amax / qmax))
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
            for b in _check_bits(bits)}


def act_sensitivity(mean_trace: float, a: torch.Tensor, bits: Iterable[int],
                    signed: bool | None = None) -> dict[int, float]:
    """Omega(b) = mean_trace * ||Q_b(a) - a||^2 for activation samples ``a`` (N, ...), each b."""
    return {b: float(mean_trace) * float(((quantize_act_pot(a, b, signed)[0] - a.detach()) ** 2).sum())
            for b in _check_bits(bits)}
