"""FPGA budgets for the bit-allocation ILP: LUT / FF / DSP / latency from the hls4ml estimator,
per layer and per pair of consecutive layers.

``estimator_costs(model, specs, x, input_fmt, config)`` returns ``{kind: ilp.PairCost}`` for the
kinds in :data:`ESTIMATOR_KINDS`; pass it as ``costs=`` to :func:`.ilp.allocate` (or let
:func:`.search.run_search` build it when a budget names one of these kinds).

Unary part.  Each (layer, weight bits, input-activation bits) candidate is estimated by
``backends/hls4ml/estimate.py`` on a one-layer IR graph holding exactly what the QAT model of
:mod:`.qat` would deploy at those bits *before* fine-tuning:

* weights: the float weights quantized by :func:`.sensitivity.quantize_weight_pot` (narrow signed,
  per-tensor power-of-two scale), so zero / power-of-two / two-digit constants are counted as the
  estimator does for the real codes (assumption A2 there);
* input: the model input's fixed-point format for the first layer; for the others an unsigned
  ``a_bits`` value with the power-of-two scale of least squared error
  (:func:`.sensitivity.quantize_act_pot`, what the learned Brevitas PoT scale approximates),
  calibrated like :func:`.qat.build_qat_model` does: on the output of the ReLU before the layer
  (before any pooling);
* bias: ``Int16Bias`` codes at scale = input scale x weight scale;
* accumulator: the IR's exact type (as the qdeploy hls4ml backend emits).

That is the Dense/Conv row: the multipliers, the adder tree and the output register, and its
latency (one output position per reuse-factor cycles for Conv, A9).

Pair part.  The nodes between weight layer i-1 and weight layer i -- what the QONNX frontend
imports for a Brevitas ``QuantReLU`` and the modules around it: ``Relu``, ``Quantize`` to the
unsigned ``a_bits_i`` type (round half even, saturating), ``MaxPool`` / ``AvgPool``, and the
``Reshape`` of a Flatten (:func:`chain_graph`) -- depend on both layers' bits: their input is layer
i-1's accumulator (its weight and input bits), their output layer i's activation bits.  For every
(option of i-1, activation bits of i) this chain is estimated on its own graph, fed by the
accumulator type of layer i-1's one-layer graph, and its rows are summed per kind; its chained
delay adds cycles only past one clock period (A10), as inside the full model.  The ILP carries these
as pair terms (:class:`.ilp.PairCost`), so the total of an allocation (:func:`.ilp.total_cost`) is the
whole-model estimate of the exported model.  A chain after the last weight layer (a final ReLU,
quantized at build_qat_model's default 8 bits) is added to the last layer's unary cost; the
model input's ``Quantize`` is a host node (float input, A14) and costs nothing.  When the specs are
not direct children of an ``nn.Sequential`` the pair parts are 0 (only Dense/Conv rows counted).

Measured against ``qdeploy estimate`` on the exported QONNX: with no QAT, on the small digits CNN of
``tests/quantization/test_hw_costs.py`` the total LUTs agree exactly (before the pair terms the
Dense/Conv rows alone were 1.7-3.1x below the estimate), and on the digits CNN search
(``recipe_cnn``, budgets lut=uniform:3 and uniform:5, weights and activations searched) within
0.1% (before: 1.85-2.93x).  Still not counted: what QAT changes -- after fine-tuning a layer
whose max|w| falls below a power of two gets half the weight scale and about 2x the LUTs of its
Dense/Conv row (MLP first layer 2.00x, CNN first dense 1.81x measured), and learned activation
scales can move by a power of two, changing the chain and next-layer widths; check the chosen
model with ``qdeploy estimate``.  Layers outside an ``nn.Sequential`` chain (residual adds, concats)
have no pair model.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import QDeployError
from . import hessian, sensitivity

__all__ = ["ESTIMATOR_KINDS", "estimator_costs", "layer_graph", "chain_graph"]

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


def _tuple(v, nd: int) -> tuple:
    return tuple(int(t) for t in v) if isinstance(v, (tuple, list)) else (int(v),) * nd


def _chains(model: nn.Module, names: Sequence[str]):
    """Modules between consecutive weight layers: ``{name: [modules before it]}`` for every spec but
    the first, plus ``"__tail__"`` (after the last).  None when the specs are not direct children of
    an ``nn.Sequential`` (no pair costs then)."""
    if not isinstance(model, nn.Sequential):
        return None
    items = list(model.named_children())
    pos = {n: j for j, (n, _) in enumerate(items)}
    if not names or any(n not in pos for n in names) or [pos[n] for n in names] != sorted(pos[n] for n in names):
        return None
    out = {}
    for a, b in zip(names, names[1:]):
        out[b] = [m for _, m in items[pos[a] + 1:pos[b]]]
    out["__tail__"] = [m for _, m in items[pos[names[-1]] + 1:]]
    return out


def chain_graph(mods: Sequence[nn.Module], in_shape: Sequence[int], in_type, a_bits: int, a_fracs: Sequence[int],
                name: str = "chain"):
    """IR graph of the nodes the QONNX frontend produces for ``mods`` (the modules between two weight
    layers of an ``nn.Sequential``), fed by a value of channels-last ``in_shape`` and fixed-point
    ``in_type`` (the previous layer's accumulator).  Each ReLU becomes ``Relu`` then ``Quantize`` to
    an unsigned ``a_bits``-bit value with ``a_fracs[k]`` fraction bits (k-th ReLU; Brevitas
    ``QuantReLU``, round half even, saturating); MaxPool1d/2d -> ``MaxPool``; AvgPool1d/2d ->
    ``AvgPool``; Flatten -> ``Reshape``; Dropout / Identity / BatchNorm (folded into the previous
    layer) -> nothing.

    Raises:
        QDeployError: another module type, or pooling with dilation / ceil_mode (names the module).
    """
    from ..ir import FixedType, GraphBuilder

    b = GraphBuilder(name)
    h = b.input("x", tuple(int(v) for v in in_shape), in_type)
    shape = tuple(int(v) for v in in_shape)
    k = 0
    for j, m in enumerate(mods):
        if isinstance(m, nn.ReLU):
            f = int(a_fracs[k])
            k += 1
            h = b.add(f"relu{j}", "Relu", [h])
            h = b.add(f"quant{j}", "Quantize", [h], attrs={"to": FixedType(int(a_bits), int(a_bits) - f, False,
                                                                             "RND_CONV", "SAT")})
        elif isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)):
            nd = 1 if isinstance(m, (nn.MaxPool1d, nn.AvgPool1d)) else 2
            if getattr(m, "ceil_mode", False) or any(d != 1 for d in _tuple(getattr(m, "dilation", 1), nd)):
                raise QDeployError(f"{type(m).__name__} with ceil_mode or dilation has no FPGA cost model "
                                   f"(module {j} of chain {name!r})")
            kern = _tuple(m.kernel_size, nd)
            st = _tuple(m.stride if m.stride is not None else m.kernel_size, nd)
            pad = _tuple(m.padding, nd)
            op = "MaxPool" if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)) else "AvgPool"
            h = b.add(f"pool{j}", op, [h], attrs={"kernel": kern, "strides": st, "pads": pad * 2})
        elif isinstance(m, nn.Flatten):
            h = b.add(f"flatten{j}", "Reshape", [h], attrs={"shape": (int(np.prod(shape)),)})
        elif isinstance(m, (nn.Dropout, nn.Identity, nn.BatchNorm1d, nn.BatchNorm2d)):
            continue
        else:
            raise QDeployError(f"{type(m).__name__} between weight layers has no FPGA cost model "
                               f"(chain {name!r}; supported: ReLU, MaxPool, AvgPool, Flatten, Dropout)")
        shape = tuple(b.values[h].shape)  # the builder infers shapes as it goes
    b.output(h)
    return b.build()


def _chain_rows(est: dict, g) -> dict:
    """Per-kind sum of a chain graph's estimate rows, as the chain costs *inside* the full model: its
    chained delay only adds cycles when it exceeds one clock period (A10), and it has no FIFO of its
    own in io_stream (the standalone graph ends with it, which the estimator charges)."""
    rows = [r for r in est["layers"] if not r.get("host")]
    tot = {k: float(sum(r[k] for r in rows)) for k in ("lut", "ff", "dsp", "bram_18k")}
    cyc = int(sum(r["latency_cycles"] for r in rows))
    if est["config"].get("io_type") == "io_stream" and cyc > 0:
        out = g.value(g.outputs[0])
        depth = 1 if len(out.shape) <= 1 else out.shape[-2]
        tot["lut"] -= math.ceil(out.dtype.width * out.shape[-1] * depth / 32)
        cyc -= 1
    cyc = cyc if cyc >= 2 else 0
    tot["latency_cycles"] = float(cyc)
    tot["latency_ns"] = float(round(cyc * float(est["config"]["clock_period"]), 3))
    return tot


def estimator_costs(model: nn.Module, specs, x, input_fmt: Mapping | None = None,
                    config: Mapping | None = None, kinds: Sequence[str] = ESTIMATOR_KINDS) -> dict:
    """FPGA cost functions ``{kind: ilp.PairCost}`` for :func:`.ilp.allocate`.

    The unary part ``fn(spec, w_bits, a_bits)`` is the estimate of the layer's one-layer graph
    (:func:`layer_graph`; for the last layer plus the chain after it, if any); the pair part
    ``fn.pair(prev_spec, prev_opt, spec, opt)`` is the estimate of the chain of ReLU / Quantize /
    pooling / Flatten nodes between the two layers (:func:`chain_graph`), fed by ``prev_spec``'s
    accumulator at ``prev_opt`` and quantized to ``opt``'s activation bits.  Units: LUT, FF, DSP,
    BRAM_18K counts; latency in clock cycles / ns.  Pair parts are 0 when the specs are not direct
    children of an ``nn.Sequential`` (then only the Dense/Conv rows are counted).

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
            raised when the first candidate is estimated; a module between weight layers without a
            cost model (names it).
    """
    from ...backends.hls4ml.estimate import estimate
    from .ilp import PairCost

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
    chains = _chains(model, names)
    # ReLU outputs on the calibration batch: build_qat_model calibrates each QuantReLU on them
    relu_out: dict = {}
    if chains:
        hooks = [m.register_forward_hook(lambda mod, a, o, k=id(m): relu_out.__setitem__(k, o.detach()))
                 for ch in chains.values() for m in ch if isinstance(m, nn.ReLU)]
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(x)
        finally:
            model.train(was)
            for h in hooks:
                h.remove()
    cache: dict = {}
    outs: dict = {}
    pcache: dict = {}
    ccfg = {**cfg, "reuse_factor": 1}

    def relu_fracs(chain, ab: int) -> list[int]:
        fr = []
        for m in chain:
            if isinstance(m, nn.ReLU):
                o = relu_out[id(m)]
                _, s = sensitivity.quantize_act_pot(o, int(ab), False)
                fr.append(_pot_frac(s))
        return fr

    def row(spec, wb: int, ab: int) -> dict:
        key = (spec.name, int(wb), int(ab))
        if key not in cache:
            a = acts[spec.name]
            chain = chains.get(spec.name) if chains else None
            if spec.name == first:
                xb, xf, sg = int(inp["bits"]), _pot_frac(inp["scale"]), bool(inp["signed"])
            elif chain and any(isinstance(m, nn.ReLU) for m in chain):
                # the input is the last QuantReLU's output (pooling keeps its type)
                xb, xf, sg = int(ab), relu_fracs(chain, ab)[-1], False
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
            tot = {k: float(r[k]) for k in ESTIMATOR_KINDS}
            ov = g.value(g.node("layer").output)
            outs[key] = (ov.shape, ov.dtype)
            if chains and spec.name == names[-1] and chains["__tail__"]:
                # a chain after the last layer (e.g. a final QuantReLU at build_qat_model's default
                # 8 bits) depends on this layer's bits only
                tail = chains["__tail__"]
                cg = chain_graph(tail, ov.shape, ov.dtype, 8, relu_fracs(tail, 8), f"{spec.name}->out")
                ce = estimate(cg, ccfg)
                rows = [q for q in ce["layers"] if not q.get("host")]
                for k in ESTIMATOR_KINDS:
                    tot[k] += float(sum(q[k] for q in rows))
            cache[key] = tot
        return cache[key]

    def pair(prev, popt, spec, opt) -> dict:
        zero = dict.fromkeys(ESTIMATOR_KINDS, 0.0)
        if not chains or spec.name not in chains or not chains[spec.name]:
            return zero
        if names.index(spec.name) == 0 or names[names.index(spec.name) - 1] != prev.name:
            return zero
        ab = int(opt[1])
        key = (spec.name, int(popt[0]), int(popt[1]), ab)
        if key not in pcache:
            row(prev, int(popt[0]), int(popt[1]))
            shape, dt = outs[(prev.name, int(popt[0]), int(popt[1]))]
            chain = chains[spec.name]
            try:
                cg = chain_graph(chain, shape, dt, ab, relu_fracs(chain, ab), f"{prev.name}->{spec.name}")
            except QDeployError as e:
                raise QDeployError(f"layers {prev.name!r} -> {spec.name!r}: {e}") from None
            pcache[key] = _chain_rows(estimate(cg, ccfg), cg)
        return pcache[key]

    def make(kind):
        return PairCost(lambda spec, wb, ab: row(spec, wb, ab)[kind],
                        lambda prev, popt, spec, opt: pair(prev, popt, spec, opt)[kind])

    return {k: make(k) for k in kinds}
