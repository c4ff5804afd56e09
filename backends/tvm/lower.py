"""Lower an IR :class:`~qdeploy.compiler.ir.Graph` to one TVM Relax function ``main``.

Runtime representation (identical to :mod:`qdeploy.compiler.reference`):

* a fixed-point value of IR shape ``S`` is an ``int64`` tensor ``[n, *S]`` of *codes*;
* a float value is a ``float32`` tensor ``[n, *S]``;
* ``n`` is a symbolic batch dimension, so one compiled library runs any batch size.

Every fixed-point op is lowered to exact int64 arithmetic replicating the reference
interpreter op by op (including its wrap-around on int64 overflow), so the codes agree bit for
bit.  Float->fixed ``Quantize`` is done in float64 exactly like
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
from ...compiler.ir.ops import OPS, avg_shift
from ...compiler.ir.types import FixedType

op = relax.op
nn = relax.op.nn

I64, F32, F64 = "int64", "float32", "float64"

#: Largest shift amount lowered (int64 shifts by >= 63 are undefined in LLVM).
MAX_SHIFT = 62


def c64(v) -> relax.Expr:
    """int64 constant (the dtype must be explicit: relax.const would silently narrow to int32)."""
    return relax.const(np.asarray(v, dtype=np.int64), I64)


def cf(v, dtype=F32) -> relax.Expr:
    return relax.const(np.asarray(v, dtype=dtype), dtype)


def _check_shift(s: int, node: Node, what: str) -> None:
    if s < 0 or s > MAX_SHIFT:
        raise UnsupportedError(f"{what} needs a shift by {s} bits (only 0..{MAX_SHIFT} can be lowered exactly)",
                               node.name)


class _Lowerer:
    def __init__(self, graph: Graph, bb: relax.BlockBuilder | None = None, batch: int | None = None):
        self.g = graph
        self.bb = bb if bb is not None else relax.BlockBuilder()
        self.n = tirx.Var("n", "int64") if batch is None else tirx.IntImm("int64", int(batch))
        self.env: dict[str, relax.Expr] = {}

    # ------------------------------------------------------------ helpers
    def emit(self, e):
        return self.bb.emit(e)

    def lshift(self, x, s: int, node: Node):
        """x * 2**s for int64 codes (numpy left_shift semantics: wraps mod 2**64)."""
        if s == 0:
            return x
        _check_shift(s, node, "aligning binary points")
        return self.emit(op.left_shift(x, c64(s)))

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
        """ap_fixed overflow handling of int64 codes ``q`` into ``t`` (== types._overflow_int)."""
        lo, hi = t.min_code, t.max_code
        if t.saturation in ("SAT", "SAT_SYM"):
            return self.emit(op.minimum(op.maximum(q, c64(lo)), c64(hi)))
        if t.saturation == "SAT_ZERO":
            bad = op.logical_or(op.less(q, c64(lo)), op.greater(q, c64(hi)))
            return self.emit(op.where(bad, c64(0), q))
        mod = 1 << t.width
        q = self.emit(op.bitwise_and(q, c64(mod - 1)))
        if t.signed:
            q = self.emit(op.where(op.greater_equal(q, c64(mod >> 1)), op.subtract(q, c64(mod)), q))
        return q

    def requantize(self, x, frac_in: int, t: FixedType, node: Node):
        """Exact ap_fixed cast of int64 codes (== types.requantize)."""
        shift = frac_in - t.frac_bits
        if shift <= 0:
            q = self.lshift(x, -shift, node)
        else:
            _check_shift(shift, node, "requantization")
            fl = self.emit(op.right_shift(x, c64(shift)))  # arithmetic shift == floor
            q = fl
            if t.rounding != "TRN":
                rem = self.emit(op.bitwise_and(x, c64((1 << shift) - 1)))
                half = c64(1 << (shift - 1))
                up = self._round_up(t.rounding, op.equal(rem, half), op.greater(rem, half),
                                    op.not_equal(rem, c64(0)), op.less(fl, c64(0)),
                                    op.equal(op.bitwise_and(fl, c64(1)), c64(1)))
                q = self.emit(op.add(fl, op.astype(self.emit(up), I64)))
        return self.overflow_int(q, t)

    def quantize_real(self, x, t: FixedType, node: Node):
        """Exact float32 -> fixed cast (== FixedType.quantize_real), computed in float64."""
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
            # the reference clips the *whole array* when any element is infinite / >= 2**62
            big = self.emit(op.max(op.abs(q)))
            lo1, hi1 = float(t.min_code) - 1, float(t.max_code) + 1
            clipped = op.minimum(op.maximum(q, cf(lo1, F64)), cf(hi1, F64))
            q = self.emit(op.where(op.equal(big, cf(np.inf, F64)), clipped, q))
            big = self.emit(op.max(op.abs(q)))
            clipped = op.minimum(op.maximum(q, cf(-(2.0 ** 61), F64)), cf(2.0 ** 61, F64))
            q = self.emit(op.where(op.greater_equal(big, cf(2.0 ** 62, F64)), clipped, q))
        return self.overflow_int(self.emit(op.astype(q, I64)), t)

    def bcast_rank(self, x, rank_from: int, rank_to: int):
        """Insert unit axes after the batch axis so a per-sample rank ``rank_from`` becomes ``rank_to``."""
        if rank_from >= rank_to:
            return x
        return self.emit(op.expand_dims(x, list(range(1, 1 + rank_to - rank_from))))

    def conv(self, x, w: np.ndarray, dtype, node: Node, groups: int):
        nd = w.ndim - 2
        k = tuple(node.attrs["kernel"])
        s = tuple(int(v) for v in node.attrs.get("strides", (1,) * nd))
        p = tuple(int(v) for v in node.attrs.get("pads", (0,) * (2 * nd)))
        if any(d != 1 for d in node.attrs.get("dilations", ())):
            raise UnsupportedError("Conv dilation is not supported", node.name)
        wc = relax.const(np.ascontiguousarray(w.astype(dtype)), dtype)
        if nd == 2:
            return self.emit(nn.conv2d(x, wc, strides=s, padding=p, groups=groups, data_layout="NHWC",
                                       kernel_layout="HWIO", out_dtype=dtype))
        if nd == 1:
            return self.emit(nn.conv1d(x, wc, strides=s, padding=p, groups=groups, data_layout="NWC",
                                       kernel_layout="WIO", out_dtype=dtype))
        raise UnsupportedError(f"{node.op} with a {len(k)}-D kernel (only 1-D and 2-D)", node.name)

    def window_sum(self, x, node: Node, dtype, channels: int):
        """Sum over each pooling window: depthwise convolution with a ones kernel."""
        k = tuple(int(v) for v in node.attrs["kernel"])
        ones = np.ones((*k, 1, channels), dtype=dtype)
        return self.conv(x, ones, dtype, node, groups=channels)

    # ------------------------------------------------------------ ops
    def node(self, n: Node):
        g = self.g
        ins = [self.env[i] for i in n.inputs]
        in_types = [g.values[i].dtype for i in n.inputs]
        in_vals = [g.values[i] for i in n.inputs]
        out_v = g.values[n.output]
        out_t = out_v.dtype
        fixed_out = isinstance(out_t, FixedType)
        o = n.op
        if o not in OPS:
            raise UnsupportedError(f"op {o!r} has no TVM lowering", n.name)
        if fixed_out and o not in ("Quantize", "Sign") and not all(isinstance(t, FixedType) for t in in_types):
            raise UnsupportedError(f"{o} with float inputs and a fixed-point output", n.name)

        if o == "Quantize":
            if isinstance(in_types[0], FixedType):
                return self.requantize(ins[0], in_types[0].frac_bits, out_t, n)
            return self.quantize_real(ins[0], out_t, n)
        if o == "Sign":
            zero = c64(0) if isinstance(in_types[0], FixedType) else cf(0.0)
            return self.emit(op.where(op.greater_equal(ins[0], zero), c64(1), c64(-1)))
        if o in ("Dense", "Conv"):
            w = n.params["weight"]
            b = n.params.get("bias")
            groups = int(n.attrs.get("groups", 1))
            if fixed_out:
                if o == "Dense":
                    acc = self.emit(op.matmul(ins[0], relax.const(np.ascontiguousarray(w.data), I64), out_dtype=I64))
                else:
                    acc = self.conv(ins[0], w.data, I64, n, groups)
                f = in_types[0].frac_bits + w.dtype.frac_bits
                acc = self.lshift(acc, out_t.frac_bits - f, n)
                if b is not None:
                    bf = b.dtype.frac_bits
                    _check_shift(out_t.frac_bits - bf, n, "aligning the bias")
                    bias = np.left_shift(b.data, out_t.frac_bits - bf)  # same wrap as the reference
                    acc = self.emit(op.add(acc, c64(bias)))
                return acc
            x = self.real(ins[0], in_types[0])
            wr = w.real().astype(np.float32)
            if o == "Dense":
                y = self.emit(op.matmul(x, cf(wr), out_dtype=F32))
            else:
                y = self.conv(x, wr, F32, n, groups)
            if b is not None:
                y = self.emit(op.add(y, cf(b.real().astype(np.float32))))
            return y
        if o == "Relu":
            zero = c64(0) if isinstance(in_types[0], FixedType) else cf(0.0)
            return self.emit(op.maximum(ins[0], zero))
        if o in ("Add", "Mul"):
            r = len(out_v.shape)
            a, bb = (self.bcast_rank(x, len(v.shape), r) for x, v in zip(ins, in_vals))
            ta, tb = in_types
            if fixed_out:
                if o == "Add":
                    F = out_t.frac_bits
                    return self.emit(op.add(self.lshift(a, F - ta.frac_bits, n), self.lshift(bb, F - tb.frac_bits, n)))
                return self.emit(op.multiply(a, bb))
            a, bb = self.real(a, ta), self.real(bb, tb)
            return self.emit(op.add(a, bb) if o == "Add" else op.multiply(a, bb))
        if o == "Affine":
            s = n.params.get("scale")
            b = n.params.get("bias")
            if fixed_out:
                y = ins[0]
                f = in_types[0].frac_bits
                if s is not None:
                    y = self.emit(op.multiply(y, c64(s.data)))
                    f += s.dtype.frac_bits
                y = self.lshift(y, out_t.frac_bits - f, n)
                if b is not None:
                    _check_shift(out_t.frac_bits - b.dtype.frac_bits, n, "aligning the bias")
                    y = self.emit(op.add(y, c64(np.left_shift(b.data, out_t.frac_bits - b.dtype.frac_bits))))
                return y
            y = self.real(ins[0], in_types[0])
            if s is not None:
                y = self.emit(op.multiply(y, cf(s.real().astype(np.float32))))
            if b is not None:
                y = self.emit(op.add(y, cf(b.real().astype(np.float32))))
            return y
        if o == "Concat":
            axis = int(n.attrs.get("axis", -1))
            axis = axis + 1 if axis >= 0 else axis
            if fixed_out:
                parts = [self.lshift(x, out_t.frac_bits - t.frac_bits, n) for x, t in zip(ins, in_types)]
            else:
                parts = [self.real(x, t) for x, t in zip(ins, in_types)]
            return self.emit(op.concat(parts, axis=axis))
        if o == "Reshape":
            return self.emit(op.reshape(ins[0], (self.n, *(int(s) for s in n.attrs["shape"]))))
        if o == "Transpose":
            return self.emit(op.permute_dims(ins[0], [0, *(int(p) + 1 for p in n.attrs["perm"])]))
        if o in ("MaxPool", "AvgPool"):
            return self.pool(n, ins[0], in_vals[0], out_t)
        if o == "GlobalAvgPool":
            x = ins[0]
            rank = len(in_vals[0].shape) + 1
            axes = list(range(1, rank - 1))
            cnt = int(np.prod(in_vals[0].shape[:-1]))
            if fixed_out:
                tot = self.emit(op.sum(x, axis=axes))
                return self._avg_div(tot, cnt, n)
            return self.emit(op.mean(self.real(x, in_types[0]), axis=axes))
        if o == "Softmax":
            return self.emit(nn.softmax(self.real(ins[0], in_types[0]), axis=-1))
        raise UnsupportedError(f"op {o!r} has no TVM lowering", n.name)

    def _avg_div(self, tot, cnt: int, n: Node):
        """floor(tot * 2**k / cnt), k = avg_shift(cnt) (== reference)."""
        y = self.lshift(tot, avg_shift(cnt), n)
        if cnt > 1:
            y = self.emit(op.floor_divide(y, c64(cnt)))
        return y

    def pool(self, n: Node, x, in_v, out_t):
        k = tuple(int(v) for v in n.attrs["kernel"])
        nd = len(k)
        if nd not in (1, 2) or len(in_v.shape) != nd + 1:
            raise UnsupportedError(f"{n.op} over {nd}-D windows (only 1-D and 2-D)", n.name)
        s = tuple(int(v) for v in n.attrs.get("strides", (1,) * nd))
        p = tuple(int(v) for v in n.attrs.get("pads", (0,) * 2 * nd))
        t0 = in_v.dtype
        C = in_v.shape[-1]
        layout = "NHWC" if nd == 2 else "NWC"
        mp = nn.max_pool2d if nd == 2 else nn.max_pool1d
        if n.op == "MaxPool":
            if isinstance(t0, FixedType):
                # pad with the type's min code: shift codes so that it becomes 0, pad with 0 explicitly
                lo = t0.min_code
                y = self.emit(op.subtract(x, c64(lo))) if lo else x
                if any(p):
                    pw = [0, 0] + [v for i in range(nd) for v in (p[i], p[i + nd])] + [0, 0]
                    y = self.emit(nn.pad(y, pw, pad_value=0.0))
                y = self.emit(mp(y, pool_size=k, strides=s, padding=(0,) * (2 * nd) if nd == 2 else (0, 0),
                                 layout=layout))
                return self.emit(op.add(y, c64(lo))) if lo else y
            return self.emit(mp(x, pool_size=k, strides=s, padding=p, layout=layout))
        if any(p):
            raise UnsupportedError("AvgPool with padding is not supported", n.name)
        cnt = int(np.prod(k))
        if isinstance(out_t, FixedType):
            tot = self.window_sum(x, n, I64, C)
            return self._avg_div(tot, cnt, n)
        xr = self.real(x, t0)
        tot = self.window_sum(xr, n, F32, C)
        return self.emit(op.divide(tot, cf(np.float32(cnt))))

    # ------------------------------------------------------------ driver
    def run(self, func_name: str = "main") -> tvm.IRModule:
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
                outs = self.bb.emit_output(relax.Tuple([self.env[o] for o in g.outputs]))
            self.bb.emit_func_output(outs)
        return self.bb.get()


def _ident(name: str) -> str:
    s = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name)
    return s if s and not s[0].isdigit() else "v_" + s


#: Name of the static batch-1 entry added by ``lower(graph, batch1_entry=True)``.
BATCH1_ENTRY = "main_b1"


def lower(graph: Graph, batch1_entry: bool = False) -> tvm.IRModule:
    """The Relax module for ``graph``.

    ``main`` takes one tensor per graph input (``[n, *shape]``, int64 codes or float32, in
    ``graph.inputs`` order) and returns a tuple with one tensor per graph output.  With
    ``batch1_entry`` the module also has ``main_b1``: the same graph with the batch fixed to 1
    (static shapes: cheaper VM calls and fully static loop nests for the scheduler).

    Raises:
        UnsupportedError: naming the node for an op or attribute without exact lowering
            (3-D convolutions/pools, shifts by more than 62 bits, AvgPool with padding,
            float inputs to an op with fixed-point output).
    """
    lw = _Lowerer(graph)
    if not batch1_entry:
        return lw.run()
    lw.run()
    return _Lowerer(graph, bb=lw.bb, batch=1).run(BATCH1_ENTRY)
