"""Precision passes: input quantization, exact float-affine -> fixed-point conversion, and
precision inference (every accumulator and intermediate gets an exact fixed type)."""
from __future__ import annotations

import numpy as np

from ..compiler.ir.graph import Const, Graph, Node, rebuild
from ..compiler.ir.types import FixedType, FloatType, exact_type_for_values, parse_type, requantize
from .manager import current_context, register_pass

#: hls4ml's default precision, used for float inputs when no exact type can be derived.
DEFAULT_INPUT_TYPE = FixedType(16, 6, True, "RND_CONV", "SAT")


@register_pass("infer_precision")
def infer_precision(graph: Graph) -> Graph:
    """Precision inference: re-run every op's exact type rule from the inputs forward
    (:mod:`qdeploy.compiler.ir.ops`).  Accumulators get ``W + X + ceil(log2 K)``-bounded exact
    widths (tighter when the weights allow); nothing is guessed and nothing can overflow."""
    return rebuild(graph, graph.nodes)


def _feeds_fixed(graph: Graph, value: str) -> bool:
    for c in graph.consumers(value):
        if any(isinstance(p.dtype, FixedType) for p in c.params.values()):
            return True
        if c.op in ("Reshape", "Transpose", "MaxPool") and _feeds_fixed(graph, c.output):
            return True
    return False


def input_type_for(data: np.ndarray | None, max_width: int = 24) -> tuple[FixedType, str]:
    """Choose a fixed type for float model inputs.

    The narrowest type (rounding RND_CONV, saturation SAT) that represents every value of the
    calibration ``data`` exactly, when one of at most ``max_width`` bits exists; otherwise
    hls4ml's default ``fixed<16,6>`` with convergent rounding and saturation.
    Returns the type and a sentence for the report.
    """
    if data is not None and np.size(data):
        t = exact_type_for_values(np.asarray(data, np.float64), max_width)
        if t is not None:
            t = t.with_modes("RND_CONV", "SAT")
            return t, f"input type {t} represents every calibration input exactly"
    return DEFAULT_INPUT_TYPE, (f"inputs are rounded to {DEFAULT_INPUT_TYPE} (hls4ml's default; LSB "
                                f"{DEFAULT_INPUT_TYPE.lsb:g}) because the calibration inputs are not all exactly "
                                f"representable in <= {max_width} bits; set input_type in the config to choose another")


@register_pass("quantize_inputs")
def quantize_inputs(graph: Graph, input_type: FixedType | str | None = None,
                    calibration: dict | None = None) -> Graph:
    """Insert a ``Quantize`` after each float graph input that feeds fixed-point layers
    (e.g. the hls4ml jet tagger, which has no input quantizer).

    Args:
        input_type: a type (or its text, e.g. ``"fixed<16,6,RND_CONV,SAT>"``) or None/"auto" to
            derive it from ``calibration`` (:func:`input_type_for`).
        calibration: input name -> batch-first float array.

    Notes (pass context): for each quantized input, why its type was chosen.  The returned graph's
    ``meta["default_input_types"]`` names the inputs whose type is hls4ml's default (neither the
    model nor the user gave one, and no exact type exists for the calibration data): the fidelity
    check then feeds the source the *unrounded* inputs, so what that rounding changes is measured
    against the source instead of hidden (:func:`qdeploy.fidelity.source_inputs`).
    """
    ctx = current_context()
    nodes = list(graph.nodes)
    new_nodes: list[Node] = []
    rename = {}
    guessed = []
    for name in graph.inputs:
        v = graph.value(name)
        if not isinstance(v.dtype, FloatType) or not graph.is_quantized() or not _feeds_fixed(graph, name):
            continue
        if isinstance(input_type, str) and input_type != "auto":
            t, why = parse_type(input_type), "input type set by the user"
        elif isinstance(input_type, FixedType):
            t, why = input_type, "input type set by the user"
        else:
            t, why = input_type_for((calibration or {}).get(name))
            if t == DEFAULT_INPUT_TYPE and not why.startswith("input type"):
                guessed.append(name)
        qn = f"{name}_quant"
        new_nodes.append(Node(qn, "Quantize", (name,), (qn,), {"to": t}))
        rename[name] = qn
        ctx.note(f"{name}: {why}")
    if not rename:
        return graph
    nodes = [n.replace(inputs=tuple(rename.get(i, i) for i in n.inputs)) for n in nodes]
    outputs = [rename.get(o, o) for o in graph.outputs]
    out = rebuild(graph, new_nodes + nodes, outputs=outputs)
    if guessed:
        out = out.with_(meta={**dict(out.meta), "default_input_types": {n: str(DEFAULT_INPUT_TYPE) for n in guessed}})
    return out


def _float_affine_eval(x_real32: np.ndarray, s: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exactly the reference interpreter's float32 Affine: x * s + b in float32."""
    return (x_real32 * s.astype(np.float32) + b.astype(np.float32)).astype(np.float32)


@register_pass("affine_to_fixed")
def affine_to_fixed(graph: Graph, max_codes: int = 1 << 16, max_frac: int = 40) -> Graph:
    """Replace a float ``Affine`` (batch norm between integer layers) that sits between a
    fixed-point value and a ``Quantize``/``Sign`` by a fixed-point Affine that gives the same
    quantized output for *every* possible input code.

    This is FINN's streamlining idea (Umuroglu & Jahre, "Streamlined Deployment for Quantized
    Neural Networks", arXiv 1709.04060, Sec. 3): a monotone float affine followed by a quantizer
    is a set of integer thresholds.  Rather than a threshold unit (which hls4ml lacks), we search
    per channel the narrowest fixed-point slope/offset (G fraction bits, G = 0..max_frac) whose
    quantized output equals the float32 model's on all input codes of the producer's type, and
    verify it by enumeration; the result is bit-exact by construction.

    The Affine is left float (and later reported) when the input range has more than
    ``max_codes`` codes or no G up to ``max_frac`` reproduces every decision.  Notes (pass
    context): each Affine converted (with the types) or left float (and why).
    """
    notes = []
    nodes = list(graph.nodes)
    for idx, n in enumerate(list(nodes)):
        if n.op != "Affine":
            continue
        s_c, b_c = n.params.get("scale"), n.params.get("bias")
        if not any(isinstance(c.dtype, FloatType) for c in (s_c, b_c) if c is not None):
            continue
        xt = graph.value(n.inputs[0]).dtype
        cons = graph.consumers(n.output)
        if not isinstance(xt, FixedType) or len(cons) != 1 or n.output in graph.outputs:
            continue
        q = cons[0]
        if q.op not in ("Quantize", "Sign"):
            continue
        n_codes = xt.max_code - xt.min_code + 1
        if n_codes > max_codes:
            notes.append(f"{n.name}: input range of {n_codes} codes too large to verify; left float")
            continue
        C = graph.value(n.output).shape[-1] if graph.value(n.output).shape else 1
        s = np.broadcast_to(s_c.real() if s_c is not None else np.ones(1), (C,)).astype(np.float64)
        b = np.broadcast_to(b_c.real() if b_c is not None else np.zeros(1), (C,)).astype(np.float64)
        codes = np.arange(xt.min_code, xt.max_code + 1, dtype=np.int64)[:, None]  # (R, 1)
        y = _float_affine_eval(xt.to_real(codes).astype(np.float32), s, b)  # (R, C)
        if q.op == "Sign":
            target = np.where(y >= 0, 1, -1)
            fq = 0
        else:
            qt = q.attrs["to"]
            target = qt.quantize_real(y)
            fq = qt.frac_bits
        # code-domain slope/offset: output-code units per input code
        a = s * 2.0 ** (fq - xt.frac_bits)
        e = b * 2.0 ** fq
        found = None
        for G in range(0, max_frac + 1):
            M = np.round(a * 2.0 ** G)
            D = np.round(e * 2.0 ** G)
            if np.abs(M).max() * max(abs(xt.min_code), abs(xt.max_code)) + np.abs(D).max() > 2.0 ** 52:
                break
            for dd in (0, -1, 1):
                z = codes * M.astype(np.int64) + (D + dd).astype(np.int64)  # (R, C) at G frac bits (output-code units)
                if q.op == "Sign":
                    got = np.where(z >= 0, 1, -1)
                else:
                    got = requantize(z, G + fq, qt)
                good = np.all(got == target, axis=0)
                if dd == 0:
                    best_D = np.where(good, D, np.nan)
                else:
                    best_D = np.where(np.isnan(best_D) & good, D + dd, best_D)
            if not np.isnan(best_D).any():
                found = (G, M, best_D)
                break
        if found is None:
            notes.append(f"{n.name}: no fixed-point affine up to {max_frac} fraction bits reproduces the float "
                         f"decisions; left float")
            continue
        G, M, D = found
        # real constants: scale_real = M * 2**-(G + fq - F_in), bias_real = D * 2**-(G + fq)
        scale = Const.from_real(np.ldexp(M, -(G + fq - xt.frac_bits)), max_width=48)
        bias = Const.from_real(np.ldexp(D, -(G + fq)), max_width=48)
        if isinstance(scale.dtype, FloatType) or isinstance(bias.dtype, FloatType):
            notes.append(f"{n.name}: fixed-point constants too wide; left float")
            continue
        nodes[idx] = n.replace(params={"scale": scale, "bias": bias})
        notes.append(f"{n.name}: float affine -> fixed-point (scale {scale.dtype}, bias {bias.dtype}), "
                     f"verified on all {n_codes} input codes x {C} channels")
    ctx = current_context()
    for text in notes:
        ctx.note(text)
    if not notes:
        return graph
    return rebuild(graph, nodes)
