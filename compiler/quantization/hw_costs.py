"""FPGA budgets for the bit-allocation ILP: per-layer LUT / FF / DSP / latency from the hls4ml estimator.

``estimator_costs(model, specs, x, input_fmt, config)`` returns ``{kind: fn(spec, w_bits, a_bits)}``
for the kinds in :data:`ESTIMATOR_KINDS`; pass it as ``costs=`` to :func:`.ilp.allocate` (or let
:func:`.search.run_search` build it when a budget names one of these kinds).

Each (layer, weight bits, input-activation bits) candidate is estimated by
``backends/hls4ml/estimate.py`` on a one-layer IR graph holding exactly what the QAT model of
:mod:`.qat` would deploy at those bits *before* fine-tuning:

* weights: the float weights quantized by :func:`.sensitivity.quantize_weight_pot` (narrow signed,
  per-tensor power-of-two scale), so zero / power-of-two / two-digit constants are counted as the
  estimator does for the real codes (assumption A2 there);
* input: the model input's fixed-point format for the first layer; for the others an unsigned
  ``a_bits`` value with the power-of-two scale of least squared error on the calibration batch
  (:func:`.sensitivity.quantize_act_pot`, what the learned Brevitas PoT scale approximates);
* bias: ``Int16Bias`` codes at scale = input scale x weight scale;
* accumulator: the IR's exact type (as the qdeploy hls4ml backend emits).

Only the Dense/Conv row is counted: the multipliers, the adder tree and the output register, and
its latency (one output position per reuse-factor cycles for Conv, A9).  ReLU, requantization and
pooling are left out, because their input width is the *previous* layer's accumulator (a cross term
between two layers' bits that a one-binary-per-(layer, width) ILP cannot express).  The cost of a
layer therefore depends only on its own bits, the ILP stays linear, and the sum of the per-layer
costs is exactly the sum of the Dense/Conv rows of the estimator for the whole model.

Measured against ``qdeploy estimate`` on the exported QONNX (digits, budgets lut=uniform:3 and
uniform:5): with no QAT the Dense/Conv rows agree at 1.00 (the weight quantizer here equals
Brevitas'); after QAT most layers stay within 4%, but a layer whose max|w| falls below a power of
two gets half the scale and about 2x the LUTs (MLP first layer 2.00x, CNN first dense 1.81x).  The
rows left out are 4-8% of the MLP's LUTs but as large as the MAC rows in the CNN (ReLU, Quantize and
MaxPool: whole-model estimate 2.0-2.9x the budgeted figure), and they change with the allocation, so
a Hessian-vs-uniform LUT ranking can flip.  The search report says so; check the chosen model with
``qdeploy estimate``.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import QDeployError
from . import hessian, sensitivity

__all__ = ["ESTIMATOR_KINDS", "estimator_costs", "layer_graph"]

#: Budget kinds the estimator provides (the keys of its per-layer rows).
ESTIMATOR_KINDS = ("lut", "ff", "dsp", "bram_18k", "latency_cycles", "latency_ns")


def _pot_frac(scale: float) -> int:
    f = -math.log2(float(scale))
    if abs(f - round(f)) > 1e-9:
        raise QDeployError(f"scale {scale} is not a power of two")
    return int(round(f))


def _weight_codes(w: torch.Tensor, bits: int) -> tuple[np.ndarray, int]:
    """Integer codes and fraction bits of :func:`.sensitivity.quantize_weight_pot`."""
    qmax = 2 ** (bits - 1) - 1
    w = w.detach().double()
    e = sensitivity.weight_scale_exponent(w, bits)
    codes = torch.clamp(torch.round(w / 2.0 ** e), -qmax, qmax).to(torch.int64).numpy()
    return codes, -e


def layer_graph(module: nn.Module, in_shape: Sequence[int], w_bits: int, x_bits: int, x_frac: int,
                x_signed: bool = False):
    """One-layer IR graph (``Dense`` or ``Conv``, node name ``"layer"``) of ``module`` quantized at
    ``w_bits`` with a ``x_bits``-bit input of ``x_frac`` fraction bits.  ``in_shape``: torch
    per-sample input shape (C, H, W) / (C, L) / (features,)."""
    from ..ir import Const, FixedType, GraphBuilder

    codes, wf = _weight_codes(module.weight, w_bits)
    w_t = FixedType(int(w_bits), int(w_bits) - wf, True)
    x_t = FixedType(int(x_bits), int(x_bits) - int(x_frac), bool(x_signed))
    bias = None
    if getattr(module, "bias", None) is not None:
        bf = wf + int(x_frac)
        bc = np.clip(np.round(module.bias.detach().double().numpy() * 2.0 ** bf), -(2 ** 15), 2 ** 15 - 1)
        bias = Const(bc.astype(np.int64), FixedType(16, 16 - bf, True))
    b = GraphBuilder("layer")
    if isinstance(module, nn.Linear):
        x = b.input("x", (int(in_shape[-1]),), x_t)
        params = {"weight": Const(codes.T, w_t)}
        if bias is not None:
            params["bias"] = bias
        h = b.add("layer", "Dense", [x], params=params)
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
        nd = 1 if isinstance(module, nn.Conv1d) else 2
        c, *sp = (int(s) for s in in_shape)
        x = b.input("x", (*sp, c), x_t)
        wk = np.transpose(codes, tuple(range(2, 2 + nd)) + (1, 0))  # [*k, Cin/g, Cout]
        pad = module.padding if isinstance(module.padding, tuple) else (module.padding,) * nd
        if any(isinstance(p, str) for p in pad):
            raise QDeployError(f"conv padding {module.padding!r} is not supported by the FPGA cost model")
        params = {"weight": Const(wk, w_t)}
        if bias is not None:
            params["bias"] = bias
        h = b.add("layer", "Conv", [x], attrs={"kernel": tuple(module.kernel_size), "strides": tuple(module.stride),
                                              "pads": tuple(pad) * 2, "groups": int(module.groups)}, params=params)
    else:
        raise QDeployError(f"{type(module).__name__} has no FPGA cost model (Linear, Conv1d, Conv2d)")
    b.output(h)
    return b.build()


def estimator_costs(model: nn.Module, specs, x, input_fmt: Mapping | None = None,
                    config: Mapping | None = None, kinds: Sequence[str] = ESTIMATOR_KINDS) -> dict:
    """Per-layer FPGA cost functions ``{kind: fn(spec, w_bits, a_bits)}`` for :func:`.ilp.allocate`.

    Args:
        model: the float model the specs were made from.
        specs: its :class:`.ilp.LayerSpec` list (:func:`.search.layer_specs`).
        x: calibration inputs (for the activation scales; a few hundred samples are plenty).
        input_fmt: ``{"bits", "scale", "signed"}`` of the model input (first layer's input).
        config: hls4ml estimator config (``part``, ``clock_period``, ``reuse_factor``, ``strategy``,
            ``io_type``...; see ``backends/hls4ml/estimate.py``).  A per-layer reuse factor is keyed
            by the *torch* layer name.
        kinds: which cost kinds to return.

    Raises:
        QDeployError: an unknown kind, or an estimator error (unknown part, illegal reuse factor),
            raised when the first candidate is estimated.
    """
    from ...backends.hls4ml.estimate import estimate

    bad = [k for k in kinds if k not in ESTIMATOR_KINDS]
    if bad:
        raise QDeployError(f"unknown estimator cost {bad}; known: {', '.join(ESTIMATOR_KINDS)}")
    inp = {"bits": 8, "scale": 2.0 ** -4, "signed": False, **(input_fmt or {})}
    cfg = dict(config or {})
    rf = cfg.get("reuse_factor")
    mods = dict(model.named_modules())
    names = [s.name for s in specs]
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    acts = hessian.layer_inputs(model, x, names)
    first = names[0] if names else None
    cache: dict = {}

    def row(spec, wb: int, ab: int) -> dict:
        key = (spec.name, int(wb), int(ab))
        if key not in cache:
            a = acts[spec.name]
            if spec.name == first:
                xb, xf, sg = int(inp["bits"]), _pot_frac(inp["scale"]), bool(inp["signed"])
            else:
                sg = bool(a.min() < 0)
                _, s = sensitivity.quantize_act_pot(a, int(ab), sg)
                xb, xf = int(ab), _pot_frac(s)
            g = layer_graph(mods[spec.name], tuple(a.shape[1:]), int(wb), xb, xf, sg)
            c = dict(cfg)
            if isinstance(rf, Mapping):
                c["reuse_factor"] = rf.get(spec.name, rf.get("default", 1))
            est = estimate(g, c)
            r = next(r for r in est["layers"] if r["name"] == "layer")
            cache[key] = {k: float(r[k]) for k in ESTIMATOR_KINDS}
        return cache[key]

    def make(kind):
        return lambda spec, wb, ab: row(spec, wb, ab)[kind]

    out = {k: make(k) for k in kinds}
    return out
