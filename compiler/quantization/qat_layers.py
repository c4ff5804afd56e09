"""Brevitas building blocks shared by the QAT model builders (:mod:`.qat` for ``nn.Sequential``,
:mod:`.qat_fx` for any ``torch.fx``-traceable module).

The quantizers are the ones ``../shared/TOOLCHAIN.md`` ("Exact recipe") found to export to exact
fixed point: power-of-two ("FixedPoint") scales everywhere, ``Int16Bias`` biases (scale = input
scale * weight scale), and a constant power-of-two input quantizer.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..errors import QDeployError

__all__ = ["CHAIN_TYPES", "is_chain", "input_quantizer", "weight_kwargs", "fold_bn_into", "quant_weight_layer", "act_quantizer"]


# the children an ``nn.Sequential`` may hold for the chain builder of :mod:`.qat`
CHAIN_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.Flatten, nn.Dropout,
               nn.Identity, nn.AvgPool2d, nn.BatchNorm1d, nn.BatchNorm2d)


def is_chain(model: nn.Module) -> bool:
    """Whether ``model`` is an ``nn.Sequential`` of :data:`CHAIN_TYPES` only (the chain builder's
    input); any other module (a residual block inside a Sequential included) goes through
    :mod:`.qat_fx`."""
    return isinstance(model, nn.Sequential) and all(isinstance(m, CHAIN_TYPES) for m in model.children())


def input_quantizer(bits: int, scale: float, signed: bool = False):
    """A Brevitas activation quantizer class with a *constant* power-of-two ``scale``.

    Fixed-point quantizers use scale = scaling_init / 2**(bits - signed), so scaling_init is set
    to ``scale * 2**(bits - signed)``.  Raises QDeployError when ``scale`` is not a power of two.
    """
    from brevitas.core.scaling import ScalingImplType
    from brevitas.quant import Int8ActPerTensorFixedPoint, Uint8ActPerTensorFixedPoint

    m, _ = np.frexp(float(scale))
    if scale <= 0 or m != 0.5:
        raise QDeployError(f"input scale {scale} is not a power of two (needed for exact fixed point)")
    base = Int8ActPerTensorFixedPoint if signed else Uint8ActPerTensorFixedPoint
    return type(f"InputQuant{'S' if signed else 'U'}{bits}", (base,), {
        "bit_width": int(bits), "scaling_impl_type": ScalingImplType.CONST,
        "scaling_init": float(scale) * 2.0 ** (int(bits) - (1 if signed else 0))})


def weight_kwargs(bits: int, in_bits: int = 8) -> dict:
    """Keyword arguments of a Brevitas ``QuantLinear``/``QuantConv*``: ``bits``-bit narrow signed
    per-tensor power-of-two weights (``Int8WeightPerTensorFixedPoint``), float output, and a bias
    quantized at scale = input scale * weight scale: ``Int16Bias`` while ``bits + in_bits <= 16``
    (``in_bits``: the layer input's bit width), else ``Int32Bias`` -- with that scale a 16-bit bias
    spans only about 2**(16 - bits - in_bits) times the layer's largest input x weight product, so
    wider layers had their biases clipped towards zero during QAT."""
    from brevitas.quant import Int8WeightPerTensorFixedPoint, Int16Bias, Int32Bias
    return dict(weight_quant=Int8WeightPerTensorFixedPoint, weight_bit_width=int(bits), bias=True,
                bias_quant=Int16Bias if int(bits) + int(in_bits) <= 16 else Int32Bias, return_quant_tensor=False)


def fold_bn_into(m: nn.Module, bn: nn.Module) -> nn.Module:
    """Copy of Linear/Conv ``m`` with eval-mode BatchNorm ``bn`` (running statistics) folded in:
    W' = W * s, b' = (b - mean) * s + beta with s = gamma / sqrt(var + eps) per output channel."""
    m = copy.deepcopy(m)
    g = bn.weight.detach() if bn.affine else torch.ones_like(bn.running_mean)
    b = bn.bias.detach() if bn.affine else torch.zeros_like(bn.running_mean)
    s = g / torch.sqrt(bn.running_var + bn.eps)
    with torch.no_grad():
        m.weight.mul_(s.reshape(-1, *([1] * (m.weight.dim() - 1))))
        b0 = m.bias.detach() if m.bias is not None else torch.zeros_like(s)
        if m.bias is None:
            m.bias = nn.Parameter(torch.zeros_like(s))
        m.bias.copy_((b0 - bn.running_mean) * s + b)
    return m


def quant_weight_layer(m: nn.Module, w_bits: int, in_bits: int = 8) -> nn.Module:
    """Brevitas ``QuantLinear`` / ``QuantConv1d`` / ``QuantConv2d`` with ``m``'s geometry and
    weights (bias zero when ``m`` has none) at ``w_bits``, its input ``in_bits`` wide
    (:func:`weight_kwargs`)."""
    from brevitas.nn import QuantConv1d, QuantConv2d, QuantLinear

    if isinstance(m, nn.Linear):
        q = QuantLinear(m.in_features, m.out_features, **weight_kwargs(w_bits, in_bits))
    else:
        cls = QuantConv2d if isinstance(m, nn.Conv2d) else QuantConv1d
        q = cls(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                dilation=m.dilation, groups=m.groups, **weight_kwargs(w_bits, in_bits))
    with torch.no_grad():
        q.weight.copy_(m.weight)
        if m.bias is not None:
            q.bias.copy_(m.bias)
        else:
            q.bias.zero_()
    return q


def act_quantizer(bits: int, signed: bool, calibration: torch.Tensor | None = None):
    """Activation quantizer class (``Uint8``/``Int8ActPerTensorFixedPoint``, learned power-of-two
    scale).  With ``calibration`` (float activations, any shape) holding a non-zero value, the scale
    starts as a learned parameter at the power-of-two scale of least squared error
    (:func:`.sensitivity.quantize_act_pot`), else Brevitas' own statistics initialize it."""
    from brevitas.quant import Int8ActPerTensorFixedPoint, Uint8ActPerTensorFixedPoint

    base = Int8ActPerTensorFixedPoint if signed else Uint8ActPerTensorFixedPoint
    if calibration is None or float(calibration.abs().max()) == 0.0:
        return base
    from brevitas.core.scaling import ScalingImplType

    from .sensitivity import quantize_act_pot
    _, sc = quantize_act_pot(calibration, int(bits), signed=signed)
    # fixed-point quantizers: scale = scaling_init / 2**(bits - signed)
    return type(f"ActQuantCal{'S' if signed else 'U'}{int(bits)}", (base,), {
        "scaling_impl_type": ScalingImplType.PARAMETER,
        "scaling_init": float(sc) * 2.0 ** (int(bits) - (1 if signed else 0))})
