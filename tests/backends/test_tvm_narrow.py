"""TVM lowering in narrow integers (issue #15, item 1): a quantized Dense/Conv whose accumulator
provably fits int32 runs in int32 (operands, accumulation, epilogue); one whose bound needs more
accumulates in int64.  Both are checked in the lowered Relax module (the dtypes of the
``matmul``/``conv2d`` calls and of the compiled TIR buffers) and bit for bit against the reference
interpreter, on inputs that drive every accumulator to its extremes; the int32/int64 boundary of
the proof is checked against a brute-force bound computed with Python integers."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from qdeploy.backends.tvm import TvmBackend  # noqa: E402
from qdeploy.backends.tvm.intplan import linear_plan, requant_dtype, storage_dtype  # noqa: E402
from qdeploy.backends.tvm.lower import lower  # noqa: E402
from qdeploy.compiler import reference as ref  # noqa: E402
from qdeploy.compiler.ir import Const, GraphBuilder, parse_type as T  # noqa: E402
from qdeploy.compiler.ir.types import FixedType  # noqa: E402

I32 = (-(1 << 31), (1 << 31) - 1)


def _calls(mod, name=None):
    """[(call, [arg dtypes], result dtype)] for every ``relax.<name>`` call (every call when
    ``name`` is None) in ``main``."""
    out = []

    def visit(e):
        if isinstance(e, relax.Call) and (name is None or getattr(e.op, "name", None) == f"relax.{name}"):
            out.append((e, [str(getattr(a.ty, "dtype", "")) for a in e.args], str(e.ty.dtype)))

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return out


def _build(graph, tmp_path):
    be = TvmBackend()
    info = be.emit(graph, {"tvm": {"schedule": "auto"}}, tmp_path)
    be.build(tmp_path, info)
    return be.load(tmp_path, info, graph)


def _extreme_feeds(graph, rng, batch):
    """Codes of every input: half random over the full range, half at the type's min/max (the
    sign pattern of each row random, so some rows maximize and some minimize each column)."""
    feeds = {}
    for name in graph.inputs:
        t = graph.values[name].dtype
        shape = (batch, *graph.values[name].shape)
        rnd = rng.integers(t.min_code, t.max_code + 1, shape, dtype=np.int64)
        ext = np.where(rng.integers(0, 2, shape) == 1, t.max_code, t.min_code).astype(np.int64)
        ext[0], ext[1] = t.max_code, t.min_code
        feeds[name] = np.concatenate([ext[:batch // 2], rnd[:batch - batch // 2]])
    return feeds


def _check_exact(graph, fn, feeds):
    want = ref.execute(graph, feeds, codes=True)
    got = fn(feeds)
    for o in graph.outputs:
        assert got[o].dtype == np.int64
        np.testing.assert_array_equal(got[o], want[o], err_msg=o)
    return want


def _narrow_graph(rng):
    """8-bit Dense (K=64) -> Quantize -> 8-bit Conv 3x3 (pads) -> Quantize -> padded MaxPool,
    all accumulators < 2**31."""
    b = GraphBuilder("narrow")
    x = b.input("x", (64,), T("fixed<8,3>"))
    d = b.add("d", "Dense", [x], params={"weight": Const(rng.integers(-128, 128, (64, 36)), T("fixed<8,1>")),
                                         "bias": Const(rng.integers(-512, 512, (36,)), T("fixed<10,4>"))})
    q = b.add("q", "Quantize", [d], attrs={"to": T("fixed<8,4,RND_CONV,SAT>")})
    r = b.add("r", "Reshape", [q], attrs={"shape": (6, 6, 1)})
    c = b.add("c", "Conv", [r], attrs={"kernel": (3, 3), "pads": (1, 1, 1, 1)},
              params={"weight": Const(rng.integers(-128, 128, (3, 3, 1, 4)), T("fixed<8,0>"))})
    q2 = b.add("q2", "Quantize", [c], attrs={"to": T("fixed<6,5,RND,SAT>")})
    b.output(b.add("mp", "MaxPool", [q2], attrs={"kernel": (2, 2), "strides": (2, 2), "pads": (0, 0, 1, 1)}))
    b.output(c)
    b.output(d)
    return b.build()


def _wide_graph(rng):
    """16-bit x 16-bit Dense over K=512: the bound (and the actual extreme sums) exceed int32."""
    b = GraphBuilder("wide")
    x = b.input("x", (512,), T("fixed<16,4>"))
    w = rng.integers(-(1 << 15), 1 << 15, (512, 3))
    w[:, 0] = -(1 << 15)  # column 0: every term at its extreme
    b.output(b.add("d", "Dense", [x], params={"weight": Const(w, T("fixed<16,1>"))}))
    return b.build()


def test_narrow_dense_conv_run_in_int32_and_are_exact(tmp_path):
    rng = np.random.default_rng(0)
    g = _narrow_graph(rng)
    mod = lower(g)
    (mm, mm_in, mm_out), = _calls(mod, "matmul")
    assert mm_in == ["int32", "int32"] and mm_out == "int32"
    (cv, cv_in, cv_out), = _calls(mod, "nn.conv2d")
    assert cv_in == ["int32", "int32"] and cv_out == "int32"
    (mp, mp_in, mp_out), = _calls(mod, "nn.max_pool2d")
    assert mp_in == ["int32"] and mp_out == "int32"
    # the requantization between them runs in int32 too, and no op computes in int64 but the
    # casts of the results at the boundary (the backend contract: int64 codes out)
    assert {d for _, _, d in _calls(mod, "right_shift")} == {"int32"}
    wide = [c.op.name for c, _, out in _calls(mod) if out == "int64"]
    assert wide == ["relax.astype"] * len(g.outputs), wide
    # the legalized TIR's matmul/conv kernels really read and accumulate int32 buffers
    tir = relax.transform.LegalizeOps()(mod)
    kernels = {gv.name_hint: f for gv, f in tir.functions.items() if gv.name_hint in ("matmul", "conv2d")}
    assert set(kernels) == {"matmul", "conv2d"}
    for name, f in kernels.items():
        assert {str(p.dtype) for p in f.params} == {"int32"}, name
    fn = _build(g, tmp_path)
    want = _check_exact(g, fn, _extreme_feeds(g, rng, 64))
    assert np.abs(want["d"]).max() > 127  # the Dense result itself is wider than its int8 operands


def test_wide_dense_accumulates_in_int64_and_is_exact(tmp_path):
    rng = np.random.default_rng(1)
    g = _wide_graph(rng)
    mod = lower(g)
    (mm, mm_in, mm_out), = _calls(mod, "matmul")
    assert mm_in == ["int64", "int64"] and mm_out == "int64"
    fn = _build(g, tmp_path)
    want = _check_exact(g, fn, _extreme_feeds(g, rng, 16))
    # the int64 accumulator was needed: real sums outside int32 occurred and came out exact
    assert want["d"].max() > I32[1] or want["d"].min() < I32[0]


def _brute_bound(x_t: FixedType, w):
    """max |partial sum| over every prefix of the reduction, every column, x at its extremes."""
    lo, hi = min(x_t.min_code, 0), max(x_t.max_code, 0)
    worst_lo, worst_hi = 0, 0
    for col in np.asarray(w).reshape(-1, np.shape(w)[-1]).T.tolist():
        s_lo = s_hi = 0
        for wk in col:
            s_lo += min(wk * lo, wk * hi)
            s_hi += max(wk * lo, wk * hi)
            worst_lo, worst_hi = min(worst_lo, s_lo), max(worst_hi, s_hi)
    return worst_lo, worst_hi


@pytest.mark.parametrize("k,expect", [((1 << 17) - 1, "int32"), (1 << 17, "int64")])
def test_int32_boundary_matches_brute_force(k, expect):
    """int8 x int8 (codes -128 * -128 = 2**14 per term): K = 2**17 terms reach 2**31 (one past
    int32), K = 2**17 - 1 stay inside."""
    x_t = T("int<8>")
    w = np.full((k, 1), -128, dtype=np.int64)
    plan = linear_plan(x_t, w, 0, None)
    lo, hi = _brute_bound(x_t, w)
    assert plan.acc_range == (lo, hi)
    assert plan.acc_dtype == expect == ("int32" if I32[0] <= lo and hi <= I32[1] else "int64")
    assert (plan.in_dtype, plan.narrow_dtype) == (expect, "int8")


def test_plan_bias_and_shift_widen_only_the_epilogue():
    x_t = T("fixed<8,3>")
    w = np.array([[100], [-100]], dtype=np.int64)  # sums in [-25500, 25500]: 100*127 + 100*128
    assert _brute_bound(x_t, w) == (-25500, 25500)
    near = linear_plan(x_t, w, 0, np.array([(1 << 31) - 1 - 25500], dtype=np.int64))
    assert (near.acc_dtype, near.epi_dtype) == ("int32", "int32")
    over = linear_plan(x_t, w, 0, np.array([(1 << 31) - 25500], dtype=np.int64))
    assert (over.acc_dtype, over.epi_dtype) == ("int32", "int64")
    # the shifted accumulator alone overflows int32, though the bias brings the sum back inside
    u_t, wu = T("ufixed<8,3>"), np.array([[100]], dtype=np.int64)  # sums in [0, 25500]
    back = linear_plan(u_t, wu, 17, np.array([-(1 << 31)], dtype=np.int64))
    assert 25500 << 17 > I32[1] and I32[0] <= (25500 << 17) - (1 << 31) <= I32[1]
    assert (back.acc_dtype, back.epi_dtype) == ("int32", "int64")
    assert linear_plan(u_t, wu, 16, np.array([-(1 << 31)], dtype=np.int64)).epi_dtype == "int32"
    shifted = linear_plan(x_t, w, 17, None)  # 25500 * 2**17 > 2**31
    assert (shifted.acc_dtype, shifted.epi_dtype) == ("int32", "int64")


def test_storage_and_requant_dtypes():
    for spec, dt in [("int<8>", "int8"), ("ufixed<8,2>", "int16"), ("fixed<16,4>", "int16"),
                     ("ufixed<16,4>", "int32"), ("fixed<32,4>", "int32"), ("fixed<33,4>", "int64")]:
        assert storage_dtype(T(spec)) == dt, spec
    assert requant_dtype(T("fixed<20,8>"), 4, T("fixed<8,4>")) == "int32"
    assert requant_dtype(T("fixed<20,8>"), -12, T("fixed<32,8>")) == "int64"  # left shift overflows
    assert requant_dtype(T("fixed<40,8>"), 4, T("fixed<8,4>")) == "int64"  # wide input
    assert requant_dtype(T("fixed<20,8>"), 4, T("fixed<31,4,TRN,WRAP>")) == "int64"  # 2**31 modulus


def test_every_int32_requant_exact_brute_force(tmp_path):
    """Every code of a 12-bit input through each rounding mode and overflow mode in int32:
    equal to the reference, which computes in int64."""
    x_t = T("fixed<12,6>")
    b = GraphBuilder("rq")
    x = b.input("x", (1 << 12,), x_t)
    modes = list(itertools.product(["TRN", "RND", "RND_CONV", "RND_ZERO", "TRN_ZERO"],
                                   ["SAT", "WRAP", "SAT_ZERO"]))
    for r, s in modes:
        b.output(b.add(f"q_{r}_{s}", "Quantize", [x], attrs={"to": T(f"fixed<5,2,{r},{s}>")}))
    g = b.build()
    mod = lower(g)
    assert {d for _, _, d in _calls(mod, "right_shift")} == {"int32"}
    fn = _build(g, tmp_path)
    feeds = {"x": np.arange(x_t.min_code, x_t.max_code + 1, dtype=np.int64)[None]}
    _check_exact(g, fn, feeds)


def test_codes_outside_the_input_type_are_refused(tmp_path):
    """The library narrows codes by the input's type: a code feed outside it is refused with the
    input's name instead of being computed differently from the reference."""
    b = GraphBuilder("bad")
    x = b.input("x", (4,), T("fixed<8,3>"))
    b.output(b.add("d", "Dense", [x], params={"weight": Const(np.ones((4, 2), dtype=np.int64), T("int<2>"))}))
    g = b.build()
    fn = _build(g, tmp_path)
    ok = {"x": np.array([[-128, 127, 0, 5]], dtype=np.int64)}
    np.testing.assert_array_equal(fn(ok)["d"], ref.execute(g, ok, codes=True)["d"])
    with pytest.raises(ValueError, match=r"input 'x' has codes outside its type fixed<8,3>"):
        fn({"x": np.array([[1 << 40, 0, 0, 0]], dtype=np.int64)})
    with pytest.raises(ValueError, match="outside its type"):
        fn({"x": np.array([[-129, 0, 0, 0]], dtype=np.int64)})


def test_add_mul_int32_where_proved_int64_else(tmp_path):
    rng = np.random.default_rng(3)
    b = GraphBuilder("binary")
    x = b.input("x", (4, 8), T("fixed<12,4>"))
    y = b.input("y", (8,), T("fixed<10,6>"))
    u = b.input("u", (8,), T("fixed<30,10>"))
    v = b.input("v", (8,), T("fixed<30,2>"))
    for name, op_, ins in [("add", "Add", [x, y]), ("mul", "Mul", [x, y]),
                           ("add_wide", "Add", [u, v]), ("mul_wide", "Mul", [u, v])]:
        b.output(b.add(name, op_, ins))
    b.output(b.add("cat", "Concat", [y, y], attrs={"axis": 0}))
    b.output(b.add("cat_wide", "Concat", [u, v], attrs={"axis": 0}))  # v shifted by 8: 37 bits
    g = b.build()
    mod = lower(g)
    adds = sorted(d for _, _, d in _calls(mod, "add"))
    muls = sorted(d for _, _, d in _calls(mod, "multiply"))
    assert adds == ["int32", "int64"] and muls == ["int32", "int64"], (adds, muls)
    assert sorted(d for _, _, d in _calls(mod, "concat")) == ["int32", "int64"]
    fn = _build(g, tmp_path)
    want = _check_exact(g, fn, _extreme_feeds(g, rng, 16))
    assert min(np.abs(want[k]).max() for k in ("add_wide", "mul_wide", "cat_wide")) > I32[1]


def test_affine_sign_int32_where_proved_int64_else(tmp_path):
    rng = np.random.default_rng(4)
    b = GraphBuilder("affine")
    x = b.input("x", (8,), T("fixed<12,4>"))
    u = b.input("u", (8,), T("fixed<30,4>"))
    sc = Const(rng.integers(-128, 128, (8,)), T("fixed<8,2>"))
    bias = Const(rng.integers(-512, 512, (8,)), T("fixed<10,8>"))
    a32 = b.add("a32", "Affine", [x], params={"scale": sc, "bias": bias})
    b.output(a32)
    b.output(b.add("a64", "Affine", [u], params={"scale": sc, "bias": bias}))
    b.output(b.add("sgn", "Sign", [a32]))
    g = b.build()
    mod = lower(g)
    assert sorted(d for _, _, d in _calls(mod, "multiply")) == ["int32", "int64"]
    (w, w_in, w_out), = _calls(mod, "where")
    assert w_out == "int32"
    fn = _build(g, tmp_path)
    want = _check_exact(g, fn, _extreme_feeds(g, rng, 16))
    assert np.abs(want["a64"]).max() > I32[1]
    assert set(np.unique(want["sgn"])) == {-1, 1}


def test_multithreshold_int32_with_out_of_range_thresholds(tmp_path):
    """Thresholds below the input's min code (always reached) and above its max code (never
    reached) are clipped for the int32 comparison; every input code gives the reference's count."""
    x_t = T("int<10>")
    b = GraphBuilder("mt")
    x = b.input("x", (1024, 3), x_t)
    th = np.array([[-5000, -512, 0, 511, 9000], [-600, -3, 7, 512, 1 << 40], [-(1 << 40), 1, 2, 3, 4]])
    b.output(b.add("mt", "MultiThreshold", [x], attrs={"to": T("int<5>")},
                   params={"thresholds": Const(th, T("int<42>")), "base": Const(np.array([0, 5, -2]), T("int<5>")),
                           "sign": Const(np.array([1, -1, 1]), T("int<2>"))}))
    g = b.build()
    mod = lower(g)
    fns = [f for gv, f in mod.functions.items() if gv.name_hint == "multi_threshold"]
    assert len(fns) == 1 and {str(p.dtype) for p in fns[0].params} == {"int32"}
    fn = _build(g, tmp_path)
    codes = np.arange(x_t.min_code, x_t.max_code + 1, dtype=np.int64)
    feeds = {"x": np.repeat(codes[None, :, None], 3, axis=2)}
    want = _check_exact(g, fn, feeds)
    # an independent count: brute force over the unclipped thresholds
    brute = np.array([[[b0 + s0 * sum(int(v >= t) for t in row) for row, b0, s0 in zip(th, [0, 5, -2], [1, -1, 1])]
                       for v in codes]])
    np.testing.assert_array_equal(want["mt"], brute)
