"""TVM backend: every op lowered to Relax must agree bit for bit (codes) with the reference
interpreter; float values agree to float32 rounding.  Each model is compiled once per module."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from qdeploy.backends import get_backend  # noqa: E402
from qdeploy.backends.tvm import TvmBackend  # noqa: E402
from qdeploy.compiler import reference as ref  # noqa: E402
from qdeploy.compiler.errors import UnsupportedError  # noqa: E402
from qdeploy.compiler.ir import Const, GraphBuilder, parse_type  # noqa: E402
from qdeploy.compiler.ir.types import FLOAT32, FixedType, ROUNDING_MODES  # noqa: E402

T = parse_type


# ---------------------------------------------------------------------------- helpers
def _compile(graph, out_dir, config=None):
    be = TvmBackend()
    info = be.emit(graph, config or {}, out_dir)
    be.build(out_dir, info)
    return info, be.load(out_dir, info, graph)


def _codes(rng, t: FixedType, shape):
    return rng.integers(t.min_code, t.max_code + 1, shape, dtype=np.int64)


def _feeds(graph, rng, batch, special=None):
    """Random runtime arrays for every graph input (codes over the full range of fixed types)."""
    feeds = {}
    for name in graph.inputs:
        v = graph.values[name]
        if special and name in special:
            feeds[name] = special[name](batch)
        elif isinstance(v.dtype, FixedType):
            feeds[name] = _codes(rng, v.dtype, (batch, *v.shape))
        else:
            feeds[name] = rng.standard_normal((batch, *v.shape)).astype(np.float32)
    return feeds


def _assert_exact(graph, got, want):
    bad = []
    for o in graph.outputs:
        assert got[o].shape == want[o].shape, (o, got[o].shape, want[o].shape)
        if isinstance(graph.values[o].dtype, FixedType):
            assert got[o].dtype == np.int64, o
            if not np.array_equal(got[o], want[o]):
                bad.append(f"{o} ({graph.values[o].dtype}): {int((got[o] != want[o]).sum())} mismatches")
        else:
            assert got[o].dtype == np.float32, o
            if not np.allclose(got[o], want[o], rtol=1e-5, atol=1e-5):
                bad.append(f"{o}: max abs err {np.abs(got[o] - want[o]).max()}")
    assert not bad, "; ".join(bad)


# ---------------------------------------------------------------------------- models
SAT_TYPES = [  # (signed, width, int_bits, saturation): narrow and full range, signed and unsigned
    (True, 6, 2, "SAT"), (True, 5, 1, "SAT_SYM"), (False, 6, 3, "SAT"), (True, 7, 3, "SAT_ZERO"),
    (True, 5, 2, "WRAP"), (False, 4, 1, "WRAP"),
]


def _quant_graph():
    """Quantize: 7 rounding modes x 6 overflow variants, from float32 and from fixed codes."""
    b = GraphBuilder("quant")
    xf = b.input("xf", (48,), FLOAT32)
    xinf = b.input("xinf", (8,), FLOAT32)  # contains +-inf and huge values
    xc = b.input("xc", (48,), T("fixed<20,8>"))  # 12 fraction bits
    xw = b.input("xw", (16,), T("fixed<44,12>"))  # 32 fraction bits, wide codes
    for r in ROUNDING_MODES:
        for signed, w, i, sat in SAT_TYPES:
            t = FixedType(w, i, signed, r, sat)
            tag = f"{r}_{'s' if signed else 'u'}{w}_{i}_{sat}"
            b.output(b.add(f"qf_{tag}", "Quantize", [xf], attrs={"to": t}))
            b.output(b.add(f"qc_{tag}", "Quantize", [xc], attrs={"to": t}))
            if sat != "WRAP":  # the reference raises for inf into WRAP
                b.output(b.add(f"qi_{tag}", "Quantize", [xinf], attrs={"to": t}))
        b.output(b.add(f"qw_{r}", "Quantize", [xw], attrs={"to": FixedType(24, 8, True, r, "SAT")}))
    b.output(b.add("q_left", "Quantize", [xc], attrs={"to": T("fixed<24,6>")}))  # adds fraction bits
    b.output(b.add("q_same", "Quantize", [xc], attrs={"to": T("fixed<10,-2,RND,WRAP>")}))
    b.output(b.add("q_wide_wrap", "Quantize", [xw], attrs={"to": T("fixed<40,30,RND_CONV,WRAP>")}))
    b.output(b.add("q_int", "Quantize", [xf], attrs={"to": T("int<8>")}))
    return b.build()


def _quant_feeds(rng, batch):
    # reals on a 2**-8 grid: exact halves for every target (<= 4 fraction bits), beyond every range
    xf = (rng.integers(-(1 << 13), 1 << 13, (batch, 48)) / 256.0).astype(np.float32)
    xf[:, :4] = [0.5, -0.5, 1.5, -2.5]
    xinf = np.tile(np.array([np.inf, -np.inf, 1e30, -1e30, 0.4375, -3.5, 7.75, -0.03125], np.float32), (batch, 1))
    low = rng.choice(np.array([0, 0x80, 0x100, 0x180, 0x7F, 0x81, 0xFF, 0x17F, 0x40, 0x1FF]), (batch, 48))
    xc = (rng.integers(-(1 << 10), 1 << 10, (batch, 48)) << 9) + low
    xc = np.clip(xc, -(1 << 19), (1 << 19) - 1)
    xw = rng.integers(-(1 << 43), 1 << 43, (batch, 16))
    xw[:, :4] = [(3 << 23) + (1 << 23), -(5 << 24) - (1 << 23), 1 << 23, -(1 << 23)]  # exact halves
    return {"xf": xf, "xinf": xinf, "xc": xc.astype(np.int64), "xw": xw.astype(np.int64)}


def _arith_graph(rng):
    b = GraphBuilder("arith")
    x = b.input("x", (4, 16), T("fixed<8,1,RND_CONV,SAT>"))
    y = b.input("y", (1, 16), T("fixed<10,4>"))
    x2 = b.input("x2", (64,), T("fixed<24,4>"))
    w = Const(rng.integers(-32, 32, (16, 8)), T("fixed<6,1>"))
    bias = Const(rng.integers(-256, 256, (8,)), T("fixed<9,3>"))
    d1 = b.add("d1", "Dense", [x], params={"weight": w, "bias": bias})
    # accumulator of ~52 bits: needs the int64 path end to end
    ww = Const(rng.integers(-(1 << 21), 1 << 21, (64, 5)), T("fixed<22,2>"))
    d2 = b.add("d2", "Dense", [x2], params={"weight": ww})
    assert b.values[d2].dtype.width > 40
    q2 = b.add("q2", "Quantize", [d2], attrs={"to": T("fixed<12,8,RND_CONV,SAT>")})
    r = b.add("relu", "Relu", [d1])
    a = b.add("add", "Add", [x, y])
    m = b.add("mul", "Mul", [x, y])
    af = b.add("aff", "Affine", [x], params={"scale": Const(rng.integers(-64, 64, (16,)), T("fixed<7,2>")),
                                             "bias": Const(rng.integers(-128, 128, (16,)), T("fixed<8,0>"))})
    af2 = b.add("aff_scalar", "Affine", [x], params={"scale": Const(np.array(-3), T("int<3>"))})
    af3 = b.add("aff_bias", "Affine", [x], params={"bias": Const(rng.integers(-8, 8, (16,)), T("fixed<4,4>"))})
    c0 = b.add("cat0", "Concat", [x, a], attrs={"axis": 0})
    c1 = b.add("cat1", "Concat", [x, d1], attrs={"axis": -1})
    rs = b.add("reshape", "Reshape", [d1], attrs={"shape": (2, 16)})
    tp = b.add("transpose", "Transpose", [x], attrs={"perm": (1, 0)})
    sg = b.add("sign", "Sign", [d1])
    sm = b.add("softmax", "Softmax", [d1])
    b.output(d1, d2, q2, r, a, m, af, af2, af3, c0, c1, rs, tp, sg, sm)
    return b.build()


def _conv_graph(rng):
    b = GraphBuilder("convnet")
    img = b.input("img", (9, 9, 4), T("fixed<8,3,RND_CONV,SAT_SYM>"))
    seq = b.input("seq", (20, 4), T("fixed<6,2>"))
    useq = b.input("useq", (12, 3), T("ufixed<5,2>"))
    wt = T("fixed<5,1>")
    c1 = b.add("conv_s2_pad", "Conv", [img], attrs={"kernel": (3, 3), "strides": (2, 2), "pads": (1, 0, 1, 2)},
               params={"weight": Const(_codes(rng, wt, (3, 3, 4, 6)), wt),
                       "bias": Const(rng.integers(-512, 512, (6,)), T("fixed<10,2>"))})
    c2 = b.add("conv_g2", "Conv", [img], attrs={"kernel": (3, 3), "groups": 2, "pads": (1, 1, 1, 1)},
               params={"weight": Const(_codes(rng, wt, (3, 3, 2, 6)), wt)})
    c3 = b.add("conv_dw", "Conv", [img], attrs={"kernel": (3, 3), "groups": 4, "strides": (1, 2)},
               params={"weight": Const(_codes(rng, wt, (3, 3, 1, 4)), wt)})
    mp = b.add("maxpool_pad", "MaxPool", [img], attrs={"kernel": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1)})
    mp2 = b.add("maxpool_allpad", "MaxPool", [img], attrs={"kernel": (2, 2), "strides": (2, 2), "pads": (2, 2, 2, 2)})
    ap3 = b.add("avgpool3", "AvgPool", [img], attrs={"kernel": (3, 3), "strides": (3, 3)})
    ap2 = b.add("avgpool2", "AvgPool", [c1], attrs={"kernel": (2, 2)})
    gap = b.add("gap", "GlobalAvgPool", [c1])
    q = b.add("q", "Quantize", [c1], attrs={"to": T("fixed<8,3,RND,SAT>")})
    qr = b.add("q_relu", "Relu", [q])
    qp = b.add("q_pool", "MaxPool", [qr], attrs={"kernel": (2, 2), "strides": (2, 2), "pads": (0, 0, 1, 1)})
    k1 = b.add("conv1d", "Conv", [seq], attrs={"kernel": (3,), "groups": 2, "strides": (2,), "pads": (1, 2)},
               params={"weight": Const(_codes(rng, wt, (3, 2, 6)), wt),
                       "bias": Const(rng.integers(-16, 16, (6,)), T("fixed<5,1>"))})
    mp1 = b.add("maxpool1d", "MaxPool", [seq], attrs={"kernel": (3,), "strides": (2,), "pads": (1, 1)})
    ap1 = b.add("avgpool1d", "AvgPool", [seq], attrs={"kernel": (5,), "strides": (5,)})
    gap1 = b.add("gap1d", "GlobalAvgPool", [seq])
    ump = b.add("umaxpool1d", "MaxPool", [useq], attrs={"kernel": (2,), "strides": (1,), "pads": (1, 0)})
    uap = b.add("uavgpool1d", "AvgPool", [useq], attrs={"kernel": (3,), "strides": (2,)})
    b.output(c1, c2, c3, mp, mp2, ap3, ap2, gap, q, qr, qp, k1, mp1, ap1, gap1, ump, uap)
    return b.build()


def _float_graph(rng):
    b = GraphBuilder("floatnet")
    xf = b.input("xf", (6, 6, 3), FLOAT32)
    v = b.input("v", (1, 1, 3), T("fixed<8,2>"))
    v2 = b.input("v2", (6, 6, 2), T("ufixed<6,1,RND,SAT>"))
    cf = b.add("conv", "Conv", [xf], attrs={"kernel": (3, 3), "pads": (1, 1, 1, 1)},
               params={"weight": Const(rng.standard_normal((3, 3, 3, 4)), FLOAT32),
                       "bias": Const(rng.standard_normal(4), FLOAT32)})
    r = b.add("relu", "Relu", [cf])
    mpf = b.add("maxpool", "MaxPool", [cf], attrs={"kernel": (2, 2), "strides": (2, 2), "pads": (1, 1, 1, 1)})
    apf = b.add("avgpool", "AvgPool", [r], attrs={"kernel": (3, 3), "strides": (3, 3)})
    gapf = b.add("gap", "GlobalAvgPool", [r])
    df = b.add("dense", "Dense", [gapf], params={"weight": Const(rng.standard_normal((4, 5)), FLOAT32)})
    sm = b.add("softmax", "Softmax", [df])
    mix = b.add("mixed_add", "Add", [xf, v])
    mmul = b.add("mixed_mul", "Mul", [v, xf])
    cat = b.add("mixed_cat", "Concat", [xf, v2], attrs={"axis": -1})
    dm = b.add("mixed_dense", "Dense", [v2], params={"weight": Const(rng.standard_normal((2, 3)), FLOAT32)})
    afm = b.add("mixed_affine", "Affine", [v2], params={"scale": Const(rng.standard_normal(2), FLOAT32)})
    sg = b.add("sign", "Sign", [xf])  # fixed output: exact
    qx = b.add("quant", "Quantize", [xf], attrs={"to": T("fixed<8,3,RND_CONV,SAT>")})  # exact
    b.output(cf, r, mpf, apf, gapf, df, sm, mix, mmul, cat, dm, afm, sg, qx)
    return b.build()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (graph, out_dir, info, run): each model compiled once for the whole module."""
    rng = np.random.default_rng(2024)
    graphs = {"quant": _quant_graph(), "arith": _arith_graph(rng), "conv": _conv_graph(rng),
              "float": _float_graph(rng)}
    res = {}
    for name, g in graphs.items():
        d = tmp_path_factory.mktemp(f"tvm_{name}")
        info, run = _compile(g, d)
        res[name] = (g, d, info, run)
    return res


# ---------------------------------------------------------------------------- tests
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the reference's inf arithmetic (inf - inf)
def test_quantize_all_modes_exact(built):
    g, _, _, run = built["quant"]
    feeds = _quant_feeds(np.random.default_rng(1), 7)
    _assert_exact(g, run(feeds), ref.execute(g, feeds, codes=True))


def test_arith_ops_exact(built):
    g, _, _, run = built["arith"]
    feeds = _feeds(g, np.random.default_rng(2), 7)
    want = ref.execute(g, feeds, codes=True)
    assert np.abs(want["d2"]).max() > 2 ** 40  # the wide accumulator is really exercised
    _assert_exact(g, run(feeds), want)


@pytest.mark.parametrize("batch", [1, 7])
def test_conv_pool_exact_any_batch(built, batch):
    g, _, _, run = built["conv"]
    feeds = _feeds(g, np.random.default_rng(3 + batch), batch)
    _assert_exact(g, run(feeds), ref.execute(g, feeds, codes=True))


def test_float_and_mixed(built):
    g, _, _, run = built["float"]
    feeds = _feeds(g, np.random.default_rng(5), 7)
    feeds["xf"][0, 0, 0, :] = [0.0, -0.0, 0.5]
    _assert_exact(g, run(feeds), ref.execute(g, feeds, codes=True))


def test_real_inputs_via_prepare_feeds(built):
    g, _, _, run = built["arith"]
    rng = np.random.default_rng(6)
    x = [rng.uniform(-1.2, 1.2, (3, *g.values[i].shape)) * (8 if i == "x2" else 1) for i in g.inputs]
    _assert_exact(g, run(ref.prepare_feeds(g, x)), ref.execute(g, x))


def test_artifacts_and_info(built):
    g, d, info, _ = built["conv"]
    assert info["tvm_version"] == tvm.__version__
    assert info["target"]["kind"] == "llvm"
    for f in info["files"]:
        assert (d / f).exists(), f
    assert info["library"].startswith("lib_") and info["library"].endswith(".so")
    assert "def main" in (d / "model.relax.txt").read_text()
    json.dumps(info)  # manifest-able
    assert isinstance(get_backend("tvm-llvm"), TvmBackend)


def test_load_from_directory_alone_and_bad_feeds(built):
    g, d, info, _ = built["arith"]
    run = TvmBackend().load(d, {}, None)  # library from tvm_build.json, graph from model.json
    feeds = _feeds(g, np.random.default_rng(7), 2)
    _assert_exact(g, run(feeds), ref.execute(g, feeds, codes=True))
    with pytest.raises(KeyError, match="x2"):
        run({k: v for k, v in feeds.items() if k != "x2"})
    with pytest.raises(ValueError, match="shape"):
        run({**feeds, "x": feeds["x"][:, :2]})


def test_reload_in_fresh_process(built, tmp_path):
    g, d, info, _ = built["conv"]
    feeds = _feeds(g, np.random.default_rng(8), 3)
    np.savez(tmp_path / "in.npz", **feeds)
    (tmp_path / "info.json").write_text(json.dumps(info))
    script = textwrap.dedent(f"""
        import json, numpy as np
        from qdeploy.backends.tvm import TvmBackend
        info = json.load(open({str(tmp_path / 'info.json')!r}))
        feeds = dict(np.load({str(tmp_path / 'in.npz')!r}))
        out = TvmBackend().load({str(d)!r}, info, None)(feeds)
        np.savez({str(tmp_path / 'out.npz')!r}, **out)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    got = dict(np.load(tmp_path / "out.npz"))
    _assert_exact(g, got, ref.execute(g, feeds, codes=True))


def test_unsupported_raises_naming_node(tmp_path, rng):
    b = GraphBuilder()
    x = b.input("x", (3, 3, 3, 2), T("fixed<8,1>"))
    w = Const(rng.integers(-2, 2, (2, 2, 2, 2, 2)), T("fixed<3,1>"))
    b.output(b.add("conv3d", "Conv", [x], attrs={"kernel": (2, 2, 2)}, params={"weight": w}))
    with pytest.raises(UnsupportedError, match="node 'conv3d'"):
        TvmBackend().emit(b.build(), {}, tmp_path)
    b = GraphBuilder()
    x = b.input("x", (4,), T("int<8>"))
    b.output(b.add("huge_shift", "Quantize", [x], attrs={"to": T("fixed<8,-60>")}))
    with pytest.raises(UnsupportedError, match="node 'huge_shift'.*shift"):
        TvmBackend().emit(b.build(), {}, tmp_path)
    assert not (tmp_path / "model.json").exists()  # nothing written before the error


def test_generic_cpu_target(tmp_path, rng):
    b = GraphBuilder()
    x = b.input("x", (8,), T("fixed<8,2>"))
    h = b.add("fc", "Dense", [x], params={"weight": Const(rng.integers(-8, 8, (8, 3)), T("int<4>"))})
    b.output(b.add("q", "Quantize", [h], attrs={"to": T("fixed<6,4,RND_INF,SAT>")}))
    g = b.build()
    info, run = _compile(g, tmp_path, {"tvm": {"mcpu": "generic", "opt_level": 2}})
    assert info["target"]["kind"] == "llvm" and info["target"]["mcpu"] == "generic" and info["opt_level"] == 2
    assert info["library_target"]["cpu"] == "generic"
    feeds = _feeds(g, rng, 5)
    _assert_exact(g, run(feeds), ref.execute(g, feeds, codes=True))
