"""The corpus: one list of :class:`Entry` (name, family tags, builder).

A builder returns a :class:`Built`: the source model (a trained Brevitas ``nn.Module`` or the
path of an onnxruntime-quantized ``.onnx`` file), the golden inputs (the first
:data:`GOLDEN` test samples of the entry's data set, in the source's own layout) and a
function running the source on inputs (the oracle: the module itself, or onnxruntime).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import brevitas_models as bm
from . import ort_models as om
from .data import dataset
from .train import trained

GOLDEN = 32
"""Golden inputs per model: the first 32 test samples."""


@dataclass
class Built:
    """A built corpus model.

    Attributes:
        model: an ``nn.Module`` (Brevitas) or a ``Path`` to an ``.onnx`` file (onnxruntime QDQ).
        golden: ``(GOLDEN, *input shape)`` float32 test inputs in the source layout.
        example: the example input ``qdeploy.api.compile`` needs for a module (batch 1), else None.
        run_source: ``inputs -> list of (n, ...) arrays``: the source model's outputs, in order.
        run_source64: the same in float64 (a ``.double()`` copy of the module), or None (ONNX).
        accuracy: top-1 test accuracy of the source (first head), a sanity figure for the table.
    """

    model: object
    golden: np.ndarray
    example: object
    run_source: Callable
    accuracy: float
    run_source64: Callable | None = None


@dataclass(frozen=True)
class Entry:
    """One corpus model: ``name`` (unique), ``tags`` (first tag: the family row of the table;
    the rest: quantizer family, bits, data set, layer patterns) and ``build`` (-> :class:`Built`)."""

    name: str
    tags: tuple[str, ...]
    build: Callable[[], Built]

    @property
    def family(self) -> str:
        return self.tags[0]


def _torch_runner(module, double: bool = False):
    import copy

    import torch
    dtype = np.float64 if double else np.float32
    if double:
        module = copy.deepcopy(module).double().eval()

    def run(x):
        with torch.no_grad():
            out = module(torch.from_numpy(np.ascontiguousarray(x, dtype=dtype)))
        outs = out if isinstance(out, tuple) else (out,)
        return [o.detach().numpy() for o in outs]
    return run


def _brevitas(name, fn, kit: bm.Kit, data: str, steps: int = 80):
    def build() -> Built:
        import torch
        x_tr, y_tr, x_te, y_te = dataset(data)
        module = trained(name, lambda: fn(kit), x_tr, y_tr, steps)
        run = _torch_runner(module)
        acc = float(np.mean(run(x_te)[0].argmax(1) == y_te))
        gold = np.ascontiguousarray(x_te[:GOLDEN])
        return Built(module, gold, torch.from_numpy(gold[:1]), run, acc, _torch_runner(module, double=True))
    return build


def _ort(name, fn, data: str, activation: str):
    def build() -> Built:
        x_tr, y_tr, x_te, y_te = dataset(data)
        path = om.quantized(name, fn, x_tr, y_tr, activation)
        run = functools.partial(om.run_ort, path)
        acc = float(np.mean(run(x_te[:256])[0].argmax(1) == y_te[:256]))
        return Built(path, np.ascontiguousarray(x_te[:GOLDEN]), None, run, acc)
    return build


def _entries() -> list[Entry]:
    E = []

    def brev(name, fn, family, bits, data, *tags, float_bias=False, steps=80):
        kit = bm.Kit(family, bits, float_bias)
        row = tags[0] if tags else f"brevitas-{family}"
        E.append(Entry(name, (row, f"quant:{family}", f"bits:{bits}", f"data:{data}", *tags[1:]),
                       _brevitas(name, fn, kit, data, steps)))

    # every quantizer family at 2..8 bits (weights and activations; 8-bit output)
    for b in range(2, 9):
        brev(f"pot_mlp_b{b}", bm.mlp, "pot", b, "digits")
    # float scales: widths 6 and 8 also come with the layer patterns below (float_chw_trap_b6, ...)
    for b, fn, data in ((2, bm.mlp, "digits"), (3, bm.cnn1d, "signals"), (4, bm.mlp, "digits"),
                        (5, bm.mlp1d, "signals"), (7, bm.cnn2d, "digits")):
        brev(f"float_{fn.__name__}_b{b}", fn, "float", b, data)
    for b, fn, data in ((2, bm.mlp, "digits"), (3, bm.cnn2d, "digits"), (4, bm.cnn1d, "signals"),
                        (5, bm.mlp1d, "signals"), (6, bm.depthwise, "digits"), (7, bm.cnn2d, "digits"),
                        (8, bm.mlp, "digits")):
        brev(f"perchannel_{fn.__name__}_b{b}", fn, "perchannel", b, data)
    for b, fn, data in ((2, bm.mlp, "digits"), (3, bm.mlp1d, "signals"), (4, bm.cnn2d, "digits"),
                        (5, bm.mlp, "digits"), (6, bm.cnn1d, "signals"), (7, bm.mlp, "digits"),
                        (8, bm.cnn2d, "digits")):
        brev(f"zeropoint_{fn.__name__}_b{b}", fn, "zeropoint", b, data)
    # layer patterns (power-of-two quantizers unless the name says otherwise)
    brev("pot_mlp_raw_logits_b6", bm.mlp_raw_logits, "pot", 6, "digits", "brevitas-pot", "raw-logits")
    brev("pot_mlp_float_bias_b6", bm.mlp, "pot", 6, "digits", "brevitas-pot", "float-bias", float_bias=True)
    brev("pot_cnn2d_b4", bm.cnn2d, "pot", 4, "digits", "layers-conv", "conv2d", "maxpool")
    brev("pot_cnn2d_b8", bm.cnn2d, "pot", 8, "digits", "layers-conv", "conv2d", "maxpool")
    brev("pot_cnn1d_b6", bm.cnn1d, "pot", 6, "signals", "layers-conv", "conv1d", "maxpool")
    brev("pot_mlp1d_b5", bm.mlp1d, "pot", 5, "signals", "layers-conv", "linear")
    brev("pot_depthwise_b6", bm.depthwise, "pot", 6, "digits", "layers-conv", "depthwise", "adaptive-avgpool",
         steps=200)
    brev("pot_chw_trap_b6", bm.chw_trap, "pot", 6, "digits", "layout-trap", "C==H==W")
    brev("pot_chw_trap_stride_b5", bm.chw_trap_stride, "pot", 5, "digits", "layout-trap", "C==H==W")
    brev("pot_cl_trap_1d_b6", bm.cnn1d_cl_trap, "pot", 6, "signals", "layout-trap", "C==L")
    brev("float_chw_trap_b6", bm.chw_trap, "float", 6, "digits", "layout-trap", "C==H==W")
    brev("pot_bn_conv_relu_b6", bm.bn_conv_relu, "pot", 6, "digits", "batchnorm", "bn-conv-relu")
    brev("pot_bn_before_ident_b6", bm.bn_before_ident, "pot", 6, "digits", "batchnorm", "bn-before-identity")
    brev("pot_bn_end_b6", bm.bn_end, "pot", 6, "digits", "batchnorm", "bn-end")
    brev("float_bn_conv_relu_b8", bm.bn_conv_relu, "float", 8, "digits", "batchnorm", "bn-conv-relu")
    brev("pot_residual_b6", bm.Residual, "pot", 6, "digits", "residual-upsample", "residual-add")
    brev("float_residual_b8", bm.Residual, "float", 8, "digits", "residual-upsample", "residual-add")
    brev("pot_upsample_b6", bm.upsample, "pot", 6, "digits", "residual-upsample", "upsample-nearest")
    brev("pot_avgpool2_b6", bm.avgpool2, "pot", 6, "digits", "pools", "avgpool")
    brev("pot_avgpool3_b6", bm.avgpool3, "pot", 6, "digits", "pools", "avgpool-9")
    brev("pot_adaptive_avgpool_b6", bm.adaptive_avgpool, "pot", 6, "digits", "pools", "adaptive-avgpool")
    brev("pot_trunc_avgpool_b6", bm.trunc_avgpool, "pot", 6, "digits", "pools", "trunc-avgpool")
    brev("pot_trunc_avgpool_round_b6", bm.trunc_avgpool_round, "pot", 6, "digits", "pools", "trunc-avgpool-round")
    brev("pot_trunc_adaptive_avgpool_b6", bm.trunc_adaptive_avgpool, "pot", 6, "digits", "pools",
         "trunc-adaptive-avgpool")
    brev("pot_two_heads_b6", bm.TwoHeads, "pot", 6, "digits", "multi-output", "two-heads")
    brev("float_two_heads_b6", bm.TwoHeads, "float", 6, "digits", "multi-output", "two-heads")

    def ort(name, fn, data, activation, *tags):
        E.append(Entry(name, ("ort-qdq", "quant:qdq-int8-perchannel", f"act:{activation}", f"data:{data}", *tags),
                       _ort(name, fn, data, activation)))

    ort("ort_mlp_u8", om.float_mlp, "digits", "QUInt8", "linear")
    ort("ort_mlp_s8", om.float_mlp, "digits", "QInt8", "linear")
    ort("ort_cnn2d_u8", om.float_cnn2d, "digits", "QUInt8", "conv2d", "maxpool")
    ort("ort_cnn2d_bn_gap_s8", om.float_cnn2d_bn_gap, "digits", "QInt8", "conv2d", "batchnorm", "global-avgpool")
    ort("ort_chw_trap_u8", om.float_chw_trap, "digits", "QUInt8", "C==H==W")
    ort("ort_cnn1d_u8", om.float_cnn1d, "signals", "QUInt8", "conv1d")
    return E


CORPUS: list[Entry] = _entries()
"""Every corpus model, in table order."""

BY_NAME = {e.name: e for e in CORPUS}


@functools.lru_cache(maxsize=None)
def built(name: str) -> Built:
    """The :class:`Built` of corpus entry ``name`` (built once per process; weights cached on disk)."""
    return BY_NAME[name].build()
