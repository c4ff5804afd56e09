"""Brevitas model families of the corpus: small quantized networks over every quantizer family
(power-of-two, float scales, per-channel, zero point) at 2..8 bits and the layer patterns real
models use (Linear, Conv1d, Conv2d, depthwise Conv2d, BatchNorm placements, residual adds,
nearest upsampling, pools, multi-output heads, C == H == W).

Each builder takes a :class:`Kit` (quantizer family + bit width) and returns an untrained
``nn.Module`` whose input is a batch of the corpus data in its own layout (digits ``(N, 1, 8, 8)``,
signals ``(N, 1, 40)``); :mod:`tests.corpus.train` trains it briefly.  Quantizers are the
installed Brevitas 0.13.4 classes (``brevitas.quant``), bit widths set through the
``bit_width`` / ``weight_bit_width`` overrides as the Brevitas docs show.
"""
from __future__ import annotations

from dataclasses import dataclass

import brevitas.nn as qnn
import torch
from brevitas.quant import (Int8ActPerTensorFixedPoint, Int8ActPerTensorFloat, Int8WeightPerChannelFloat,
                            Int8WeightPerTensorFixedPoint, Int8WeightPerTensorFloat, Int16Bias, Int32Bias,
                            ShiftedUint8ActPerTensorFloat, TruncTo8bit, Uint8ActPerTensorFixedPoint,
                            Uint8ActPerTensorFloat)
from torch import nn

#: quantizer family -> (signed act, unsigned act, weight, bias) Brevitas quantizer classes
FAMILIES = {
    "pot": (Int8ActPerTensorFixedPoint, Uint8ActPerTensorFixedPoint, Int8WeightPerTensorFixedPoint, Int16Bias),
    "float": (Int8ActPerTensorFloat, Uint8ActPerTensorFloat, Int8WeightPerTensorFloat, Int32Bias),
    "perchannel": (Int8ActPerTensorFloat, Uint8ActPerTensorFloat, Int8WeightPerChannelFloat, Int32Bias),
    "zeropoint": (ShiftedUint8ActPerTensorFloat, ShiftedUint8ActPerTensorFloat, Int8WeightPerTensorFloat, Int32Bias),
}


@dataclass(frozen=True)
class Kit:
    """A quantizer family (a key of :data:`FAMILIES`) at ``bits`` bits (2..8) for weights and
    activations; the model output quantizer is always 8-bit signed of the same family.
    ``float_bias``: biases left unquantized (Brevitas' default ``bias_quant=None``)."""

    family: str
    bits: int
    float_bias: bool = False

    def _q(self, i):
        return FAMILIES[self.family][i]

    def inp(self):
        """Input quantizer (signed; zero-point family: shifted unsigned)."""
        return qnn.QuantIdentity(act_quant=self._q(0), bit_width=self.bits, return_quant_tensor=True)

    def ident(self):
        """A signed requantizer between layers."""
        return qnn.QuantIdentity(act_quant=self._q(0), bit_width=self.bits, return_quant_tensor=True)

    def relu(self):
        return qnn.QuantReLU(act_quant=self._q(1), bit_width=self.bits, return_quant_tensor=True)

    def out(self):
        """8-bit output quantizer returning a plain tensor."""
        return qnn.QuantIdentity(act_quant=self._q(0), bit_width=8, return_quant_tensor=False)

    def _wb(self, bias):
        return dict(weight_quant=self._q(2), weight_bit_width=self.bits, bias=bias,
                    bias_quant=None if (self.float_bias or not bias) else self._q(3),
                    # a layer fed a zero-point input cannot return a QuantTensor (Brevitas asserts)
                    return_quant_tensor=self.family != "zeropoint")

    def linear(self, i, o, bias=True):
        return qnn.QuantLinear(i, o, **self._wb(bias))

    def conv2d(self, i, o, k, stride=1, padding=0, groups=1, bias=True):
        return qnn.QuantConv2d(i, o, k, stride=stride, padding=padding, groups=groups, **self._wb(bias))

    def conv1d(self, i, o, k, stride=1, padding=0, bias=True):
        return qnn.QuantConv1d(i, o, k, stride=stride, padding=padding, **self._wb(bias))


class Seq(nn.Sequential):
    """``nn.Sequential`` with a readable class name in the exported graph."""


# ----------------------------------------------------------------------------- digits (N, 1, 8, 8)
def mlp(k: Kit) -> nn.Module:
    """Flatten -> Linear(64, 32) -> ReLU -> Linear(32, 10)."""
    return Seq(k.inp(), nn.Flatten(), k.linear(64, 32), k.relu(), k.linear(32, 10), k.out())


def mlp_raw_logits(k: Kit) -> nn.Module:
    """As :func:`mlp` with no output quantizer: the logits are the last accumulator (bias included)."""
    return Seq(k.inp(), nn.Flatten(), k.linear(64, 32), k.relu(),
               qnn.QuantLinear(32, 10, weight_quant=k._q(2), weight_bit_width=k.bits, bias=True,
                               bias_quant=k._q(3)))


def cnn2d(k: Kit) -> nn.Module:
    """Conv3x3(1->8) -> ReLU -> MaxPool2 -> Conv3x3(8->16) -> ReLU -> MaxPool2 -> Linear(64, 10)."""
    return Seq(k.inp(), k.conv2d(1, 8, 3, padding=1), k.relu(), nn.MaxPool2d(2),
               k.conv2d(8, 16, 3, padding=1), k.relu(), nn.MaxPool2d(2), nn.Flatten(), k.linear(64, 10), k.out())


def chw_trap(k: Kit) -> nn.Module:
    """C == H == W == 8: Conv3x3(1->8, pad 1) -> ReLU -> Flatten (NCHW order) -> Linear(512, 10)."""
    return Seq(k.inp(), k.conv2d(1, 8, 3, padding=1), k.relu(), nn.Flatten(), k.linear(512, 10), k.out())


def chw_trap_stride(k: Kit) -> nn.Module:
    """C == H == W == 4: Conv3x3(1->4, stride 2, pad 1) -> ReLU -> Conv1x1(4->4) -> ReLU -> Flatten -> Linear(64, 10)."""
    return Seq(k.inp(), k.conv2d(1, 4, 3, stride=2, padding=1), k.relu(), k.conv2d(4, 4, 1), k.relu(),
               nn.Flatten(), k.linear(64, 10), k.out())


def depthwise(k: Kit) -> nn.Module:
    """Conv3x3(1->8) -> ReLU -> depthwise Conv3x3(8, groups=8) -> ReLU -> Conv1x1(8->16) -> ReLU ->
    AdaptiveAvgPool(1) -> requant -> Linear(16, 10)."""
    return Seq(k.inp(), k.conv2d(1, 8, 3, padding=1), k.relu(), k.conv2d(8, 8, 3, padding=1, groups=8), k.relu(),
               k.conv2d(8, 16, 1), k.relu(), nn.AdaptiveAvgPool2d(1), k.ident(), nn.Flatten(), k.linear(16, 10),
               k.out())


def bn_conv_relu(k: Kit) -> nn.Module:
    """Conv (no bias) -> BatchNorm2d -> QuantReLU (twice) -> MaxPool -> Linear."""
    return Seq(k.inp(), k.conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), k.relu(), nn.MaxPool2d(2),
               k.conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), k.relu(), nn.MaxPool2d(2),
               nn.Flatten(), k.linear(32, 10), k.out())


def bn_before_ident(k: Kit) -> nn.Module:
    """Conv -> QuantReLU -> BatchNorm2d -> QuantIdentity -> Conv -> ... (BN between two quantizers)."""
    return Seq(k.inp(), k.conv2d(1, 8, 3, padding=1), k.relu(), nn.BatchNorm2d(8), k.ident(), nn.MaxPool2d(2),
               k.conv2d(8, 8, 3, padding=1), k.relu(), nn.MaxPool2d(2), nn.Flatten(), k.linear(32, 10), k.out())


def bn_end(k: Kit) -> nn.Module:
    """MLP whose last layer is a BatchNorm1d on the logits (a float output)."""
    return Seq(k.inp(), nn.Flatten(), k.linear(64, 32), k.relu(), k.linear(32, 10), nn.BatchNorm1d(10))


class Residual(nn.Module):
    """Stem Conv(1->8) -> ReLU; branch Conv -> ReLU -> Conv; ``relu(q(stem) + q(branch))`` with one
    shared requantizer ``q`` (same scale on both addends, the Brevitas ResNet idiom) -> MaxPool -> Linear."""

    def __init__(self, k: Kit):
        super().__init__()
        self.inp, self.stem, self.r0 = k.inp(), k.conv2d(1, 8, 3, padding=1), k.relu()
        self.c1, self.r1, self.c2 = k.conv2d(8, 8, 3, padding=1), k.relu(), k.conv2d(8, 8, 3, padding=1)
        self.shared, self.r2 = k.ident(), k.relu()
        self.pool, self.fc, self.out = nn.MaxPool2d(4), k.linear(32, 10), k.out()

    def forward(self, x):
        h = self.r0(self.stem(self.inp(x)))
        y = self.c2(self.r1(self.c1(h)))
        z = self.r2(self.shared(h) + self.shared(y))
        return self.out(self.fc(torch.flatten(self.pool(z), 1)))


def upsample(k: Kit) -> nn.Module:
    """Conv(stride 2) 8x8 -> 4x4 -> nn.Upsample(x2, nearest) -> Conv -> ReLU -> MaxPool -> Linear."""
    return Seq(k.inp(), k.conv2d(1, 8, 3, stride=2, padding=1), k.relu(), nn.Upsample(scale_factor=2, mode="nearest"),
               k.conv2d(8, 8, 3, padding=1), k.relu(), nn.MaxPool2d(2), nn.Flatten(), k.linear(128, 10), k.out())


def _pool_net(k: Kit, pool: nn.Module, feat: int, requant: bool = True) -> nn.Module:
    return Seq(k.inp(), k.conv2d(1, 8, 3, padding=1), k.relu(), pool, *( [k.ident()] if requant else []),
               nn.Flatten(), k.linear(feat, 10), k.out())


def avgpool2(k: Kit) -> nn.Module:
    """nn.AvgPool2d(2) (window of 4: a power of two) -> requant -> Linear."""
    return _pool_net(k, nn.AvgPool2d(2), 128)


def avgpool3(k: Kit) -> nn.Module:
    """nn.AvgPool2d(3, stride 2) (window of 9) -> requant -> Linear."""
    return _pool_net(k, nn.AvgPool2d(3, stride=2), 72)


def adaptive_avgpool(k: Kit) -> nn.Module:
    """nn.AdaptiveAvgPool2d(2) (8x8 -> 2x2: windows of 16) -> requant -> Linear."""
    return _pool_net(k, nn.AdaptiveAvgPool2d(2), 32)


def trunc_avgpool(k: Kit) -> nn.Module:
    """brevitas.nn.TruncAvgPool2d(2) with ``TruncTo8bit`` (floor) -> Linear."""
    return _pool_net(k, qnn.TruncAvgPool2d(2, trunc_quant=TruncTo8bit, return_quant_tensor=True), 128, requant=False)


def trunc_avgpool_round(k: Kit) -> nn.Module:
    """brevitas.nn.TruncAvgPool2d(2) with its default ``RoundTo8bit`` -> Linear."""
    return _pool_net(k, qnn.TruncAvgPool2d(2, return_quant_tensor=True), 128, requant=False)


def trunc_adaptive_avgpool(k: Kit) -> nn.Module:
    """brevitas.nn.TruncAdaptiveAvgPool2d(1) with ``TruncTo8bit`` (global average of 64) -> Linear."""
    return _pool_net(k, qnn.TruncAdaptiveAvgPool2d(1, trunc_quant=TruncTo8bit, return_quant_tensor=True), 8,
                     requant=False)


class TwoHeads(nn.Module):
    """A conv trunk with two heads: digit class (10) and parity (2); ``forward`` returns both."""

    def __init__(self, k: Kit):
        super().__init__()
        self.trunk = Seq(k.inp(), k.conv2d(1, 8, 3, padding=1), k.relu(), nn.MaxPool2d(2), nn.Flatten())
        self.h1, self.o1 = k.linear(128, 10), k.out()
        self.h2, self.o2 = k.linear(128, 2), k.out()

    def forward(self, x):
        t = self.trunk(x)
        return self.o1(self.h1(t)), self.o2(self.h2(t))


# ----------------------------------------------------------------------------- signals (N, 1, 40)
def cnn1d(k: Kit) -> nn.Module:
    """Conv1d(1->8, k5, s2) -> ReLU -> Conv1d(8->16, k3, s2) -> ReLU -> MaxPool1d(2) -> Linear(80, 10)."""
    return Seq(k.inp(), k.conv1d(1, 8, 5, stride=2, padding=2), k.relu(), k.conv1d(8, 16, 3, stride=2, padding=1),
               k.relu(), nn.MaxPool1d(2), nn.Flatten(), k.linear(80, 10), k.out())


def cnn1d_cl_trap(k: Kit) -> nn.Module:
    """C == L == 10: Conv1d(1->10, k5, s4) -> ReLU -> Flatten (NCL order) -> Linear(100, 10)."""
    return Seq(k.inp(), k.conv1d(1, 10, 5, stride=4, padding=2), k.relu(), nn.Flatten(), k.linear(100, 10), k.out())


def mlp1d(k: Kit) -> nn.Module:
    """Flatten (1, 40) -> Linear(40, 32) -> ReLU -> Linear(32, 10) on signals."""
    return Seq(k.inp(), nn.Flatten(), k.linear(40, 32), k.relu(), k.linear(32, 10), k.out())
