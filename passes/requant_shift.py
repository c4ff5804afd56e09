"""The ``requant_shift`` pass: MultiThreshold requantizers -> proved multiply-and-shift chains."""
from __future__ import annotations

from ..compiler.ir.graph import Graph, Node, rebuild
from ..compiler.ir.shiftform import affine_constants, clamp_type, node_shift_form
from ..compiler.ir.types import MAX_WIDTH, FixedType
from .manager import current_context, register_pass

#: Widest multiplier / offset constant the pass emits: hls4ml carries layer constants as float64
#: (``BatchNormalization`` ``scale_data``/``bias_data``, printed in decimal into the weight
#: headers), exact only up to 53 significant bits.
MAX_CONST_BITS = 53


def _fresh(graph: Graph, taken: set, base: str) -> str:
    name, i = base, 1
    while name in taken or name in graph.values:
        name = f"{base}_{i}"
        i += 1
    taken.add(name)
    return name


@register_pass("requant_shift")
def requant_shift(graph: Graph, max_width: int = MAX_WIDTH, max_const_bits: int = MAX_CONST_BITS) -> Graph:
    """Rewrite every ``MultiThreshold`` that has a proved multiply-and-shift form into
    ``Affine`` (fixed-point ``scale = K * 2**(F_in - S - F_out)``, ``bias = R * 2**-(S + F_out)``,
    per channel) followed by ``Quantize`` into the op's ``to`` type with TRN rounding (or RND_CONV,
    for a form that rounds half to even) and SAT saturation
    (:func:`~qdeploy.compiler.ir.shiftform.clamp_type`).

    The form ``clamp(rnd((x * K + R) / 2**S))`` (``rnd`` the floor or, when no floor form exists,
    round half to even: an exactly dyadic requantizer with ties, e.g. power-of-two scales with
    QONNX ``ROUND``) is searched and proved equal to the thresholds
    on EVERY code of the input's type by :func:`qdeploy.compiler.ir.shiftform.node_shift_form`
    (exact integer arithmetic, the clamp included), so the rewrite is bit-exact by construction;
    a node without a form (irregular steps, round-half-even ties, or a form wider than the caps)
    is kept as it is and a note says why.  Method: the integer-only requantization of Jacob et
    al., CVPR 2018, section 2.2 (multiplier and shift), proved against the thresholds of
    Umuroglu & Jahre, arXiv 1709.04060, section 3.

    It runs for every target (it is in :func:`qdeploy.passes.default_pipeline`): hls4ml has no
    thresholding layer, and on TVM (CPU) one multiply, shift and clamp per element beat the
    ``T`` compares of the threshold count: measured on this project's 2-core build machine, a
    ``[8, 8, 32]`` 16-bit accumulator requantized to int8 (T = 255) at batch 256 took 78 ms as a
    threshold count and 27-30 ms as multiply-and-shift (default TVM schedule; 197-255 ms vs
    20-28 ms with ``schedule: auto``); ``benchmarks/requant_tvm.py`` reruns it.  The value keeps its name; its type becomes ``clamp_type(to)`` (the
    same codes, only the rounding/saturation modes of the description change).

    Args:
        max_width: cap on the accumulator ``x * K + R`` (bits; the IR's 62 by default).
        max_const_bits: cap on ``K`` and ``R`` (bits; 53 by default, see :data:`MAX_CONST_BITS`).
    Notes (pass context): one summary ``"requant_shift: N of M MultiThreshold nodes became
    multiply-and-shift (K bits, S)"`` and one line per node kept, with the reason.
    """
    nodes: list[Node] = []
    taken = {n.name for n in graph.nodes}
    done, total, kept, shapes = 0, 0, [], []
    for n in graph.nodes:
        if n.op != "MultiThreshold":
            nodes.append(n)
            continue
        total += 1
        xt = graph.value(n.inputs[0]).dtype
        res = node_shift_form(n, xt, max_width, max_const_bits) if isinstance(xt, FixedType) else None
        if res is None or res.form is None:
            kept.append(f"{n.name}: kept as MultiThreshold ({res.reason if res else 'float input'})")
            nodes.append(n)
            continue
        f = res.form
        xv = graph.value(n.inputs[0])
        c = xv.shape[-1] if xv.shape else 1
        scale, bias = affine_constants(f, xt, c)
        acc = _fresh(graph, taken, f"{n.name}_mul")
        nodes.append(Node(acc, "Affine", n.inputs, (acc,), {}, {"scale": scale, "bias": bias}))
        nodes.append(Node(n.name, "Quantize", (acc,), n.outputs, {"to": clamp_type(f.out, f.rounding)}))
        done += 1
        shapes.append((f.k_bits, f.S, f.rounding))
    if not total:
        return graph
    ctx = current_context()
    detail = ", ".join(f"{k} bits, S={s}" + (", round half to even" if r == "RND_CONV" else "")
                       for k, s, r in sorted(set(shapes)))
    ctx.note(f"requant_shift: {done} of {total} MultiThreshold nodes became multiply-and-shift"
             + (f" ({detail})" if detail else ""))
    for line in kept:
        ctx.note(line)
    if not done:
        return graph
    return rebuild(graph, nodes)
