"""Lower an IR :class:`~qdeploy.compiler.ir.Graph` to one TVM Relax function ``main``.

Runtime representation (identical to :mod:`qdeploy.compiler.reference`):

* a fixed-point value of IR shape ``S`` is an ``int64`` tensor ``[n, *S]`` of *codes*;
* a float value is a ``float32`` tensor ``[n, *S]``;
* ``n`` is a symbolic batch dimension, so one compiled library runs any batch size.

Every fixed-point op is lowered to exact integer arithmetic replicating the reference
interpreter op by op (including its wrap-around on int64 overflow), so the codes agree bit for
bit.  The function's parameters and results are int64 codes (the backend contract); inside,
ops whose entries are marked :func:`~.relax_util.accepts_narrow` compute in the narrower dtypes
that :mod:`.intplan` proves exact from the IR's types (int32 operands, accumulators and
epilogues for ``Dense``/``Conv`` whose bounds fit, int32 requantization and ``MaxPool``), every
other entry receives int64 codes (:meth:`RelaxLowering.cast`, one cast per value and dtype).  Narrowing a value is exact
because its codes lie in its IR type's range; graph inputs are int64 codes that must lie in
their type's range too (``CompiledModel`` quantizes reals into it; the loader's ``run`` checks
code feeds).  Float->fixed ``Quantize`` is done in float64 exactly like
:meth:`~qdeploy.compiler.ir.types.FixedType.quantize_real`.  Float (unquantized) ops run in
float32 and agree with the reference only to float rounding (different summation order).

Differences from the reference, documented:

* the reference *raises* for NaN/inf/too-large values quantized into a ``WRAP`` type; compiled
  code cannot raise, it produces unspecified codes for such elements;
* ``Add``/``Mul`` of operands with different per-sample ranks broadcast per sample (a lower-rank
  operand gets unit axes inserted after the batch axis); the reference's NumPy broadcast agrees
  with this for batch size 1.

Anything that cannot be lowered exactly raises
:class:`~qdeploy.compiler.errors.UnsupportedError` naming the node.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx

from ...compiler.errors import UnsupportedError
from ...compiler.ir.graph import Graph, Node
from ...compiler.ir.ops import avg_shift, get as get_op
from ...compiler.ir.types import FixedType
from .ops import LOWERING
from .intplan import fits, requant_dtype
from .relax_util import F32, F64, I64, cf, check_shift, cint, dtype_of, nn, op


class RelaxLowering:
    """Builds one Relax function from an IR graph: the driver (:meth:`run`), the per-node
    dispatch through :data:`.ops.LOWERING` (:meth:`node`), and the exact integer helpers the op
    entries share (alignment shifts, ap_fixed casts, real views, convolutions, averages).

    Args:
        graph: the IR graph.
        bb: the block builder to add the function to (a fresh one by default).
        batch: a static batch size; ``None`` makes the batch a symbolic dimension ``n``.
    """

    def __init__(self, graph: Graph, bb: relax.BlockBuilder | None = None, batch: int | None = None):
        self.g = graph
        self.bb = bb if bb is not None else relax.BlockBuilder()
        self.n = tirx.Var("n", "int64") if batch is None else tirx.IntImm("int64", int(batch))
        self.env: dict[str, relax.Expr] = {}
        self._casts: dict = {}

    # ------------------------------------------------------------ helpers
    def emit(self, e):
        """Bind Relax expression ``e`` in the current dataflow block; returns the bound variable."""
        return self.bb.emit(e)

    def cast(self, x, dtype: str):
        """``x`` as ``dtype``: ``x`` itself when it has that dtype, else one ``astype`` binding
        per (value, dtype) for the whole function.  Exact only for values whose codes fit
        ``dtype`` (the callers prove it from the IR types, :mod:`.intplan`)."""
        if dtype_of(x) == dtype:
            return x
        key = (x, dtype)
        hit = self._casts.get(key)
        if hit is None:
            hit = self._casts[key] = self.emit(op.astype(x, dtype))
        return hit

    def lshift(self, x, s: int, node: Node):
        """x * 2**s for integer codes in ``x``'s dtype (numpy left_shift semantics for int64:
        wraps mod 2**64; narrower dtypes are used only where no overflow is proved)."""
        if s == 0:
            return x
        check_shift(s, node, "aligning binary points")
        return self.emit(op.left_shift(x, cint(s, dtype_of(x))))

    def real(self, x, t):
        """float32 real view of a runtime value of type ``t`` (== reference ``_real``)."""
        if isinstance(t, FixedType):
            y = self.emit(op.astype(x, F64))  # round-to-nearest like numpy int64->float64
            if t.frac_bits:
                y = self.emit(op.multiply(y, cf(np.ldexp(1.0, -t.frac_bits), F64)))
            return self.emit(op.astype(y, F32))
        return x

    @staticmethod
    def _round_up(mode, is_half, above, inexact, neg, odd):
        """Boolean Relax expression: add 1 to the floor (mirrors types._round_up); None for TRN."""
        if mode == "TRN":
            return None
        if mode == "TRN_ZERO":
            return op.logical_and(inexact, neg)
        if mode == "RND":
            return op.logical_or(above, is_half)
        if mode == "RND_MIN_INF":
            return above
        if mode == "RND_ZERO":
            return op.logical_or(above, op.logical_and(is_half, neg))
        if mode == "RND_INF":
            return op.logical_or(above, op.logical_and(is_half, op.logical_not(neg)))
        if mode == "RND_CONV":
            return op.logical_or(above, op.logical_and(is_half, odd))
        raise ValueError(mode)

    def overflow_int(self, q, t: FixedType):
        """ap_fixed overflow handling of integer codes ``q`` into ``t`` (== types._overflow_int),
        in ``q``'s dtype (int64, or int32 where :func:`.intplan.requant_dtype` proved it exact)."""
        dt = dtype_of(q)
        lo, hi = t.min_code, t.max_code
        if t.saturation in ("SAT", "SAT_SYM"):
            return self.emit(op.minimum(op.maximum(q, cint(lo, dt)), cint(hi, dt)))
        if t.saturation == "SAT_ZERO":
            bad = op.logical_or(op.less(q, cint(lo, dt)), op.greater(q, cint(hi, dt)))
            return self.emit(op.where(bad, cint(0, dt), q))
        mod = 1 << t.width
        q = self.emit(op.bitwise_and(q, cint(mod - 1, dt)))
        if t.signed:
            q = self.emit(op.where(op.greater_equal(q, cint(mod >> 1, dt)), op.subtract(q, cint(mod, dt)), q))
        return q

    def requantize(self, x, frac_in: int, t: FixedType, node: Node, in_t: FixedType | None = None):
        """Exact ap_fixed cast of integer codes (== types.requantize).

        Computed in int32 when ``in_t`` (the input's IR type) is given and
        :func:`.intplan.requant_dtype` proves every intermediate fits, else in int64 (``x`` is
        cast as needed).  Returns codes in that dtype."""
        shift = frac_in - t.frac_bits
        dt = requant_dtype(in_t, shift, t) if in_t is not None else I64
        x = self.cast(x, dt)
        if shift <= 0:
            q = self.lshift(x, -shift, node)
        else:
            check_shift(shift, node, "requantization")
            fl = self.emit(op.right_shift(x, cint(shift, dt)))  # arithmetic shift == floor
            q = fl
            if t.rounding != "TRN":
                rem = self.emit(op.bitwise_and(x, cint((1 << shift) - 1, dt)))
                half = cint(1 << (shift - 1), dt)
                up = self._round_up(t.rounding, op.equal(rem, half), op.greater(rem, half),
                                    op.not_equal(rem, cint(0, dt)), op.less(fl, cint(0, dt)),
                                    op.equal(op.bitwise_and(fl, cint(1, dt)), cint(1, dt)))
                q = self.emit(op.add(fl, op.astype(self.emit(up), dt)))
        return self.overflow_int(q, t)

    def quantize_real(self, x, t: FixedType, node: Node):
        """Exact float32 -> fixed cast (== FixedType.quantize_real), computed in float64; codes in int32
        when the saturated range fits it, else int64."""
        F = t.frac_bits
        if abs(F) > 1000:
            raise UnsupportedError(f"Quantize to {t}: scale 2**{F} is out of float64 range", node.name)
        q = self.emit(op.multiply(op.astype(x, F64), cf(np.ldexp(1.0, F), F64)))  # exact (power of two)
        fl = self.emit(op.floor(q))
        if t.rounding != "TRN":
            rem = self.emit(op.subtract(q, fl))  # exact in float64
            # odd: fl mod 2 == 1, computed as fl - 2*floor(fl/2) (exact for integral float64)
            odd = op.equal(op.subtract(fl, op.multiply(op.floor(op.multiply(fl, cf(0.5, F64))), cf(2.0, F64))),
                           cf(1.0, F64))
            up = self._round_up(t.rounding, op.equal(rem, cf(0.5, F64)), op.greater(rem, cf(0.5, F64)),
                                op.not_equal(rem, cf(0.0, F64)), op.less(fl, cf(0.0, F64)), odd)
            q = self.emit(op.add(fl, op.astype(self.emit(up), F64)))
        else:
            q = fl
        if t.saturation != "WRAP":
            # The reference clips the *whole array* to [lo - 1, hi + 1] when any element is
            # infinite (and to +-2**61 when any is >= 2**62) before its int64 cast.  Under SAT,
            # SAT_SYM and SAT_ZERO the overflow step then sees only which side of [lo, hi] a value
            # lies on, which neither clip changes; so clipping every element to [lo - 1, hi + 1]
            # gives the same codes, element by element, with no whole-array reductions (which
            # would split the fused kernel), and the codes then fit the narrowest integer type.
            lo1, hi1 = int(t.min_code) - 1, int(t.max_code) + 1
            q = self.emit(op.minimum(op.maximum(q, cf(float(lo1), F64)), cf(float(hi1), F64)))
            dt = "int32" if fits(lo1, hi1, "int32") else I64
            return self.overflow_int(self.emit(op.astype(q, dt)), t)
        return self.overflow_int(self.emit(op.astype(q, I64)), t)

    def bcast_rank(self, x, rank_from: int, rank_to: int):
        """Insert unit axes after the batch axis so a per-sample rank ``rank_from`` becomes ``rank_to``."""
        if rank_from >= rank_to:
            return x
        return self.emit(op.expand_dims(x, list(range(1, 1 + rank_to - rank_from))))

    def conv(self, x, w: np.ndarray, dtype, node: Node, groups: int, w_dtype: str | None = None):
        """Channels-last 1-D/2-D convolution of ``x`` by the constant ``w`` ([*kernel, C_in/groups,
        C_out]) with the node's strides, pads and (a Conv's) dilations, accumulating in ``dtype``
        (TVM casts both operands to it before multiplying); the weight constant is stored as
        ``w_dtype`` (default ``dtype``; its codes must fit)."""
        nd = w.ndim - 2
        k = tuple(node.attrs["kernel"])
        s = tuple(int(v) for v in node.attrs.get("strides", (1,) * nd))
        p = tuple(int(v) for v in node.attrs.get("pads", (0,) * (2 * nd)))
        d = node.attrs.get("dilations", 1) if node.op == "Conv" else 1
        d = (int(d),) * nd if isinstance(d, (int, np.integer)) else tuple(int(v) for v in d)
        w_dtype = w_dtype or dtype
        wc = relax.const(np.ascontiguousarray(w.astype(w_dtype)), w_dtype)
        if nd == 2:
            return self.emit(nn.conv2d(x, wc, strides=s, padding=p, dilation=d, groups=groups, data_layout="NHWC",
                                       kernel_layout="HWIO", out_dtype=dtype))
        if nd == 1:
            return self.emit(nn.conv1d(x, wc, strides=s, padding=p, dilation=d, groups=groups, data_layout="NWC",
                                       kernel_layout="WIO", out_dtype=dtype))
        raise UnsupportedError(f"{node.op} with a {len(k)}-D kernel (only 1-D and 2-D)", node.name)

    def window_sum(self, x, node: Node, dtype, channels: int):
        """Sum over each pooling window: depthwise convolution with a ones kernel."""
        k = tuple(int(v) for v in node.attrs["kernel"])
        ones = np.ones((*k, 1, channels), dtype=dtype)
        return self.conv(x, ones, dtype, node, groups=channels)

    # ------------------------------------------------------------ ops
    def node(self, n: Node):
        """The Relax expression of node ``n``: its entry of :data:`.ops.LOWERING`.

        Raises:
            UnsupportedError: naming the node for an op without exact lowering, or for float
                inputs to an op with a fixed-point output that is not a quantizer.
        """
        lower_op = LOWERING.lookup(n)
        g = self.g
        in_types = [g.values[i].dtype for i in n.inputs]
        ins = [self.env[i] for i in n.inputs]
        if not getattr(lower_op, "accepts_narrow", False):  # int64 codes, as the entry expects
            ins = [self.cast(x, I64) if isinstance(t, FixedType) else x for x, t in zip(ins, in_types)]
        out_t = g.values[n.output].dtype
        if isinstance(out_t, FixedType) and not get_op(n.op).quantizes and \
                not all(isinstance(t, FixedType) for t in in_types):
            raise UnsupportedError(f"{n.op} with float inputs and a fixed-point output", n.name)
        return lower_op(self, n, ins, in_types, out_t)

    def avg_div(self, tot, cnt: int, n: Node):
        """floor(tot * 2**k / cnt), k = avg_shift(cnt) (== reference), in ``tot``'s dtype (the
        caller proves ``tot * 2**k`` fits it)."""
        y = self.lshift(tot, avg_shift(cnt), n)
        if cnt > 1:
            y = self.emit(op.floor_divide(y, cint(cnt, dtype_of(y))))
        return y

    # ------------------------------------------------------------ driver
    def run(self, func_name: str = "main") -> tvm.IRModule:
        """Add function ``func_name`` (one parameter per graph input, a tuple of the graph
        outputs) to the block builder and return the module built so far."""
        g = self.g
        params = []
        for name in g.inputs:
            v = g.values[name]
            dt = I64 if isinstance(v.dtype, FixedType) else F32
            var = relax.Var(_ident(name), relax.TensorType([self.n, *v.shape], dt))
            params.append(var)
            self.env[name] = var
        with self.bb.function(func_name, params):
            with self.bb.dataflow():
                for n in g.nodes:
                    self.env[n.output] = self.node(n)
                res = [self.cast(self.env[o], I64) if isinstance(g.values[o].dtype, FixedType) else self.env[o]
                       for o in g.outputs]  # the contract: int64 codes out
                outs = self.bb.emit_output(relax.Tuple(res))
            self.bb.emit_func_output(outs)
        return self.bb.get()


def _ident(name: str) -> str:
    s = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name)
    return s if s and not s[0].isdigit() else "v_" + s


#: Name of the static batch-1 entry added by ``lower(graph, batch1_entry=True)``.
BATCH1_ENTRY = "main_b1"


def static_entry(batch: int) -> str:
    """Name of the static entry for batch size ``batch`` (``main_b1``, ``main_b256``, ...)."""
    return f"main_b{int(batch)}"


def lower(graph: Graph, batch1_entry: bool = False, static_batches=()) -> tvm.IRModule:
    """The Relax module for ``graph``.

    ``main`` takes one tensor per graph input (``[n, *shape]``, int64 codes or float32, in
    ``graph.inputs`` order) and returns a tuple with one tensor per graph output.  With
    ``batch1_entry`` the module also has ``main_b1``: the same graph with the batch fixed to 1
    (static shapes: cheaper VM calls and fully static loop nests for the scheduler).  Each size
    ``B`` in ``static_batches`` adds such a static entry :func:`static_entry` (``main_bB``, e.g. the
    batch a meta-schedule tuning ran at, :mod:`.tune`); ``1`` there is the same ``main_b1``.

    Raises:
        UnsupportedError: naming the node for an op or attribute without exact lowering
            (3-D convolutions/pools, shifts by more than 62 bits, AvgPool with padding,
            float inputs to an op with fixed-point output).
        ValueError: a static batch size below 1.
    """
    batches = sorted({int(b) for b in static_batches} | ({1} if batch1_entry else set()))
    if batches and batches[0] < 1:
        raise ValueError(f"static batch sizes must be >= 1, got {batches[0]}")
    lw = RelaxLowering(graph)
    mod = lw.run()
    for b in batches:
        mod = RelaxLowering(graph, bb=lw.bb, batch=b).run(static_entry(b))
    return mod
