"""hls4ml backend: the g++ C simulation must equal the reference interpreter bit for bit.

Each compile costs a few seconds, so several ops are batched into each model (multi-output
graphs); builds are cached by source hash in ``~/.cache/qdeploy/hls4ml``.
"""
import json
from pathlib import Path
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("hls4ml")
if shutil.which("g++") is None:
    pytest.skip("g++ is needed for the hls4ml C simulation", allow_module_level=True)

from qdeploy.backends.hls4ml import Hls4mlBackend  # noqa: E402
from qdeploy.compiler import reference as ref  # noqa: E402
from qdeploy.compiler.errors import CompileError, UnsupportedError  # noqa: E402
from qdeploy.compiler.ir import Const, GraphBuilder, parse_type  # noqa: E402
from qdeploy.compiler.ir.graph import Graph  # noqa: E402
from qdeploy.compiler.ir.types import FixedType, FloatType  # noqa: E402
from qdeploy.passes import affine_to_fixed  # noqa: E402

T = parse_type


def _c(rng, lo, hi, shape, t):
    return Const(rng.integers(lo, hi, shape), T(t))


def compile_and_check(g: Graph, X, out_dir, config=None):
    """emit + build + load, then compare every graph output with the reference (codes)."""
    be = Hls4mlBackend()
    info = be.emit(g, config or {}, out_dir)
    be.build(out_dir, info)
    json.dumps(info)  # manifest-able
    f = be.load(out_dir, info, g)
    feeds = ref.prepare_feeds(g, X)
    got = f(feeds)
    want = ref.execute(g, feeds, codes=True)
    for k in g.outputs:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        bad = int(np.sum(got[k] != want[k]))
        assert bad == 0, f"output {k}: {bad} of {got[k].size} values differ"
    return info, want


# ---------------------------------------------------------------------------------------- models
def mlp(rng, in_t="fixed<8,3,RND_CONV,SAT>"):
    """Float input -> Quantize (host) -> fc1 (weights with negative int bits) -> Relu -> Quantize
    (unsigned) -> three heads: narrow SAT_SYM/RND, a wide-accumulator dense (24-bit weights and 20-bit
    activations, TRN_ZERO/SAT_ZERO), RND_INF/WRAP + a float output scale (host epilogue)."""
    b = GraphBuilder("mlp")
    x = b.input("x", (12,), FloatType())
    h = b.add("qin", "Quantize", [x], attrs={"to": T(in_t)})
    h = b.add("fc1", "Dense", [h], params={"weight": _c(rng, -8, 8, (12, 10), "fixed<4,-1>"),
                                           "bias": _c(rng, -60, 60, 10, "fixed<8,2>")})
    h = b.add("r1", "Relu", [h])
    h = b.add("q1", "Quantize", [h], attrs={"to": T("ufixed<6,1,RND_CONV,SAT>")})
    o1 = b.add("fc2", "Dense", [h], params={"weight": _c(rng, -8, 8, (10, 5), "fixed<4,1>")})
    o1 = b.add("q2", "Quantize", [o1], attrs={"to": T("fixed<4,1,RND,SAT_SYM>")})
    w = b.add("q16", "Quantize", [h], attrs={"to": T("ufixed<20,1>")})
    w = b.add("fcw", "Dense", [w], params={"weight": _c(rng, -2 ** 23, 2 ** 23, (10, 6), "fixed<24,-3>"),
                                           "bias": _c(rng, -2 ** 20, 2 ** 20, 6, "fixed<24,-2>")})
    o2 = b.add("q3", "Quantize", [w], attrs={"to": T("fixed<10,-3,TRN_ZERO,SAT_ZERO>")})
    o3 = b.add("fc3", "Dense", [h], params={"weight": _c(rng, -30, 30, (10, 4), "fixed<6,0>"),
                                            "bias": _c(rng, -30, 30, 4, "fixed<6,1>")})
    o3 = b.add("q4", "Quantize", [o3], attrs={"to": T("fixed<5,1,RND_INF,WRAP>")})
    o4 = b.add("scale", "Affine", [o3], params={"scale": Const(np.float32([0.37]), FloatType())})
    b.output(o1, o2, o3, o4)
    return b.build()


@pytest.fixture(scope="module")
def mlp_artifact(tmp_path_factory):
    rng = np.random.default_rng(7)
    g = mlp(rng)
    d = tmp_path_factory.mktemp("mlp")
    X = rng.normal(0, 4, (400, 12)).astype(np.float32)
    info, want = compile_and_check(g, X, d)
    return g, d, info, X, want


def test_mlp_exact(mlp_artifact):
    g, d, info, X, want = mlp_artifact
    assert info["host_nodes"] == {"prologue": ["qin"], "epilogue": ["scale"]}
    assert (d / "hls4ml_prj" / "build_prj.tcl").is_file()
    assert (d / info["so"]).is_file() and not info["so"].startswith("/")
    assert any("fused Relu 'r1'" in s for s in info["notes"])
    # saturations and wide accumulator actually exercised
    fcw = ref.execute(g, X, keep=True)["fcw"]
    assert g.value("fcw").dtype.width > 40 and np.abs(fcw).max() > 2 ** 32
    assert (want["q2"] == 7).any() and (want["q2"] == -7).any()
    # no layer fell back to the hls4ml default type
    for lay in info["layers"]:
        assert "fixed<16,6" not in json.dumps(lay["types"]), lay


@pytest.mark.parametrize("in_t", ["ufixed<7,2,RND_MIN_INF,SAT>", "fixed<9,4,RND_ZERO,WRAP>"])
@pytest.mark.slow
def test_mlp_input_types(tmp_path, in_t):
    rng = np.random.default_rng(3)
    compile_and_check(mlp(rng, in_t), rng.normal(0, 6, (200, 12)).astype(np.float32), tmp_path)


def test_reload_fresh_process_and_moved(mlp_artifact, tmp_path):
    g, d, info, X, want = mlp_artifact
    moved = tmp_path / "moved"
    shutil.copytree(d, moved)
    g.save(str(tmp_path / "g"))
    np.save(tmp_path / "x.npy", X)
    (tmp_path / "info.json").write_text(json.dumps(info))
    code = f"""
import json, numpy as np
from qdeploy.backends.hls4ml import Hls4mlBackend
from qdeploy.compiler import reference as ref
from qdeploy.compiler.ir.graph import Graph
g = Graph.load({str(tmp_path / 'g')!r})
info = json.load(open({str(tmp_path / 'info.json')!r}))
f = Hls4mlBackend().load({str(moved)!r}, info, g)
out = f(ref.prepare_feeds(g, np.load({str(tmp_path / 'x.npy')!r})))
np.savez({str(tmp_path / 'out.npz')!r}, **out)
"""
    weights = Path(d) / "hls4ml_prj" / "firmware" / "weights"
    hidden = weights.with_name("weights_hidden")
    weights.rename(hidden)  # the moved copy must read its own weight files, not the original's
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    finally:
        hidden.rename(weights)
    assert r.returncode == 0, r.stderr[-2000:]
    with np.load(tmp_path / "out.npz") as z:
        for k in g.outputs:
            assert np.array_equal(z[k], want[k]), k


def test_build_cache_ignores_weight_values(mlp_artifact, tmp_path):
    """The C simulation loads weights from firmware/weights/*.txt: a model with the same layers and
    types but other weight values reuses the cached library, and computes with its own weights."""
    g, d, info, X, want = mlp_artifact
    rng = np.random.default_rng(11)
    nodes = []
    for n in g.nodes:
        if n.op == "Dense":
            w = n.params["weight"]
            n = n.replace(params={**n.params, "weight": Const(w.data[rng.permutation(w.data.shape[0])], w.dtype)})
        nodes.append(n)
    g2 = g.with_(nodes=nodes)
    assert g2.digest() != g.digest()
    be = Hls4mlBackend()
    info2 = be.emit(g2, {}, tmp_path)
    be.build(tmp_path, info2)
    assert info2["build_cached"] and info2["source_hash"] == info["source_hash"]
    feeds = ref.prepare_feeds(g2, X)
    out = be.load(tmp_path, info2, g2)(feeds)
    want2 = ref.execute(g2, feeds, codes=True)
    assert all(np.array_equal(out[k], want2[k]) for k in g2.outputs)
    assert any(not np.array_equal(want2[k], want[k]) for k in g2.outputs)


def test_build_cache_hit(mlp_artifact, tmp_path):
    g, d, info, X, want = mlp_artifact
    be = Hls4mlBackend()
    info2 = be.emit(g, {}, tmp_path)
    be.build(tmp_path, info2)
    assert info2["build_cached"] and info2["source_hash"] == info["source_hash"]
    out = be.load(tmp_path, info2, g)(ref.prepare_feeds(g, X))
    assert all(np.array_equal(out[k], want[k]) for k in g.outputs)


def conv2d_net(rng, stream=False):
    """Conv2D 3x3/s2/pad1 + bias -> Relu+Quantize; grouped conv (split); max pool (plain and padded);
    avg pool 2x2 (unsigned) and 3x3 (signed, non-power-of-two); global avg pool (power of two and
    not); Concat; residual Add.  ``stream``: only what hls4ml's io_stream pooling supports
    (windows = strides, no padding)."""
    b = GraphBuilder("cnn")
    x = b.input("x", (8, 8, 4), T("fixed<6,2,RND_CONV,SAT>"))
    c1 = b.add("c1", "Conv", [x], attrs={"kernel": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1)},
               params={"weight": _c(rng, -16, 16, (3, 3, 4, 6), "fixed<5,1>"),
                       "bias": _c(rng, -40, 40, 6, "fixed<8,3>")})
    h = b.add("r1", "Relu", [c1])
    q1 = b.add("q1", "Quantize", [h], attrs={"to": T("ufixed<6,2,RND_CONV,SAT>")})          # (4,4,6)
    c2 = b.add("c2", "Conv", [x], attrs={"kernel": (3, 3), "strides": (1, 1), "pads": (1, 1, 1, 1), "groups": 2},
               params={"weight": _c(rng, -8, 8, (3, 3, 2, 4), "fixed<4,0>")})
    q2 = b.add("q2", "Quantize", [c2], attrs={"to": T("fixed<7,3,RND_CONV,SAT>")})          # (8,8,4)
    mp = b.add("mp", "MaxPool", [q2], attrs={"kernel": (2, 2), "strides": (2, 2)})          # (4,4,4)
    if not stream:
        mpp = b.add("mpp", "MaxPool", [q2], attrs={"kernel": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1)})
    s3 = (3, 3) if stream else (1, 1)
    ap3 = b.add("ap3", "AvgPool", [q2], attrs={"kernel": (3, 3), "strides": s3})  # (6,6,4)|(2,2,4) signed n=9
    ap2 = b.add("ap2", "AvgPool", [q1], attrs={"kernel": (2, 2), "strides": (2, 2)})        # (2,2,6)
    c3 = b.add("c3", "Conv", [q1], attrs={"kernel": (1, 1)},
               params={"weight": _c(rng, -8, 8, (1, 1, 6, 4), "fixed<4,1>")})
    q3 = b.add("q3", "Quantize", [c3], attrs={"to": T("fixed<7,3,RND_CONV,SAT>")})
    add = b.add("add", "Add", [mp, q3])                                                   # (4,4,4)
    cat = b.add("cat", "Concat", [q1, mp] + ([] if stream else [mpp]), attrs={"axis": -1})  # (4,4,14)
    gap = b.add("gap", "GlobalAvgPool", [cat])                                            # n=16
    gap3 = b.add("gap3", "GlobalAvgPool", [ap3])                                  # n=36 (4 in stream), signed
    b.output(add, ap2, gap, gap3, ap3)
    return b.build()


@pytest.fixture(scope="module")
def cnn_graph():
    rng = np.random.default_rng(11)
    return conv2d_net(rng), rng.normal(0, 1.5, (60, 8, 8, 4)).astype(np.float32)


def test_conv2d_pool_concat_add(cnn_graph, tmp_path):
    g, X = cnn_graph
    info, want = compile_and_check(g, X, tmp_path)
    assert any("block-diagonal" in s for s in info["notes"])
    assert any("'ap3'" in s and "shifted" in s for s in info["notes"])
    assert (want["ap3"] < 0).any() and (want["gap3"] < 0).any()


def test_conv2d_io_stream(cnn_graph, tmp_path):
    g, X = cnn_graph
    # overlapping / padded pooling aborts hls4ml's streaming C simulation: refused up front
    with pytest.raises(UnsupportedError, match="node 'mpp'"):
        Hls4mlBackend().emit(g, {"hls4ml": {"io_type": "io_stream"}}, tmp_path / "refused")
    g2 = conv2d_net(np.random.default_rng(11), stream=True)
    info, _ = compile_and_check(g2, X[:30], tmp_path / "ok", {"hls4ml": {"io_type": "io_stream",
                                                                      "strategy": "Resource", "reuse_factor": 2}})
    assert info["io_type"] == "io_stream" and info["strategy"] == "Resource"


def conv1d_net(rng):
    """Conv1D k3/s2/pad + bias; Dense on a (L, C) tensor (pointwise); MaxPool1D; GlobalAvgPool1D
    (signed, n=5); Transpose; Reshape; Mul of two tensors; a 2-input graph."""
    b = GraphBuilder("c1d")
    x = b.input("x", (10, 3), T("fixed<6,2>"))
    y = b.input("y", (4,), T("ufixed<5,1,RND_CONV,SAT>"))
    c = b.add("c1", "Conv", [x], attrs={"kernel": (3,), "strides": (2,), "pads": (1, 1)},
              params={"weight": _c(rng, -8, 8, (3, 3, 4), "fixed<4,0>"), "bias": _c(rng, -8, 8, 4, "fixed<4,0>")})
    q = b.add("q1", "Quantize", [c], attrs={"to": T("fixed<6,2,RND_CONV,SAT>")})          # (5,4)
    pw = b.add("pw", "Dense", [q], params={"weight": _c(rng, -8, 8, (4, 4), "fixed<4,1>")})  # (5,4)
    pwq = b.add("pwq", "Quantize", [pw], attrs={"to": T("fixed<6,2,RND_CONV,SAT>")})
    mp = b.add("mp", "MaxPool", [pwq], attrs={"kernel": (2,), "strides": (1,)})          # (4,4)
    gp = b.add("gp", "GlobalAvgPool", [pwq])                                             # (4,) n=5 signed
    tr = b.add("tr", "Transpose", [mp], attrs={"perm": (1, 0)})                          # (4,4)
    fl = b.add("fl", "Reshape", [tr], attrs={"shape": (16,)})
    fc = b.add("fc", "Dense", [fl], params={"weight": _c(rng, -8, 8, (16, 4), "fixed<4,1>")})
    fq = b.add("fq", "Quantize", [fc], attrs={"to": T("fixed<6,3,RND_CONV,SAT>")})
    mul = b.add("mul", "Mul", [fq, y])
    b.output(mul, gp, tr)
    return b.build()


def test_conv1d_transpose_mul(tmp_path):
    rng = np.random.default_rng(5)
    g = conv1d_net(rng)
    X = [rng.normal(0, 2, (200, 10, 3)).astype(np.float32), rng.uniform(0, 2, (200, 4)).astype(np.float32)]
    info, want = compile_and_check(g, X, tmp_path)
    assert any("pointwise Conv1D" in s for s in info["notes"])
    assert [d["value"] for d in info["device_inputs"]] == ["x", "y"]


def bnn(rng, k=32, n=16):
    """TFC-like after passes.affine_to_fixed: Sign (host) -> Dense +-1 -> fixed Affine -> Sign ->
    Dense +-1 -> fixed Affine -> Sign -> Dense -> float scale (host)."""
    b = GraphBuilder("bnn")
    x = b.input("x", (k,), FloatType())
    h = b.add("in_sign", "Sign", [x])
    for i, (a, c) in enumerate([(k, n), (n, n)]):
        h = b.add(f"fc{i}", "Dense", [h], params={"weight": Const(rng.choice([-1, 1], (a, c)), FixedType(2, 2, True))})
        s = rng.uniform(0.05, 0.3, c).astype(np.float32) * rng.choice([-1, 1], c)
        h = b.add(f"bn{i}", "Affine", [h], params={"scale": Const(s, FloatType()),
                                                   "bias": Const(rng.normal(0, 1, c).astype(np.float32), FloatType())})
        h = b.add(f"act{i}", "Sign", [h])
    h = b.add("fc_out", "Dense", [h], params={"weight": Const(rng.choice([-1, 1], (n, 10)), FixedType(2, 2, True))})
    h = b.add("tn", "Affine", [h], params={"scale": Const(np.float32([0.04]), FloatType()),
                                          "bias": Const(np.float32([-1.1]), FloatType())})
    b.output(h)
    g = affine_to_fixed(b.build())
    return g


def test_bnn_sign_affine(tmp_path):
    rng = np.random.default_rng(2)
    g = bnn(rng)
    assert isinstance(g.node("bn0").params["scale"].dtype, FixedType)
    X = rng.normal(0, 1, (300, 32)).astype(np.float32)
    X[:10, :5] = 0.0  # Sign(0) = +1 on both sides
    info, _ = compile_and_check(g, X, tmp_path)
    assert info["host_nodes"] == {"prologue": ["in_sign"], "epilogue": ["tn"]}
    classes = {lay["name"]: lay["class"] for lay in info["layers"]}
    assert classes["bn0"] == "BatchNormalization" and classes["act0"] == "Activation"
    # intermediate Sign values were exercised with both signs
    inter = ref.execute(g, X, keep=True)
    assert set(np.unique(inter["act0"])) == {-1, 1}


def test_vivado_backend(tmp_path):
    rng = np.random.default_rng(9)
    g = mlp(rng, "fixed<7,2,RND_CONV,SAT>")
    X = rng.normal(0, 3, (150, 12)).astype(np.float32)
    cfg = {"hls4ml": {"backend": "Vivado", "part": "xc7z020clg400-1", "clock_period": 10, "strategy": "Resource",
                      "reuse_factor": 2, "project_name": "tfc_core"}}
    info, _ = compile_and_check(g, X, tmp_path, cfg)
    prj = tmp_path / "hls4ml_prj"
    assert not (prj / "build_opt.tcl").exists()  # Vivado-backend layout
    assert "xc7z020clg400-1" in (prj / "project.tcl").read_text()
    assert (prj / "firmware" / "tfc_core.cpp").is_file() and info["so"].endswith(".so")


def test_unsupported_ops_name_node(tmp_path):
    rng = np.random.default_rng(0)
    b = GraphBuilder("bad")
    x = b.input("x", (4, 4, 2), T("ufixed<4,1>"))
    h = b.add("pool", "MaxPool", [x], attrs={"kernel": (3, 3), "strides": (1, 1), "pads": (1, 0, 0, 1)})
    b.output(h)
    # (a padded unsigned MaxPool is exact since explicit zero padding; overlapping windows in
    # io_stream are not)
    with pytest.raises(UnsupportedError, match="node 'pool'.*io_stream"):
        Hls4mlBackend().emit(b.build(), {"hls4ml": {"io_type": "io_stream"}}, tmp_path)
    b = GraphBuilder("bad2")
    x = b.input("x", (4,), T("fixed<8,1>"))
    y = b.input("y", (1,), T("fixed<8,1>"))
    h = b.add("bmul", "Mul", [x, y])
    b.output(h)
    with pytest.raises(UnsupportedError, match="node 'bmul'.*broadcasting"):
        Hls4mlBackend().emit(b.build(), {}, tmp_path)
    b = GraphBuilder("wide")
    x = b.input("x", (4,), T("fixed<30,1>"))
    h = b.add("fc", "Dense", [x], params={"weight": _c(rng, -2 ** 29, 2 ** 29, (4, 2), "fixed<30,1>")})
    b.output(h)
    with pytest.raises(UnsupportedError, match="node 'fc'.*53-bit"):
        Hls4mlBackend().emit(b.build(), {}, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["Vitis", "Vivado"])
def test_bnn_io_stream(tmp_path, backend):
    rng = np.random.default_rng(4)
    g = bnn(rng)
    compile_and_check(g, rng.normal(0, 1, (100, 32)).astype(np.float32), tmp_path,
                      {"hls4ml": {"backend": backend, "io_type": "io_stream"}})


@pytest.mark.slow
def test_cnn_stream_vivado_latency(tmp_path):
    rng = np.random.default_rng(12)
    g = conv2d_net(rng, stream=True)
    compile_and_check(g, rng.normal(0, 1.5, (20, 8, 8, 4)).astype(np.float32), tmp_path,
                      {"hls4ml": {"backend": "Vivado", "io_type": "io_stream"}})


def test_catapult_asic_backend(tmp_path):
    """hls4ml's Catapult backend (ASIC firmware, Algorithmic C ac_fixed types): its C simulation,
    built with g++ from the AC headers hls4ml ships, equals the reference bit for bit (the MLP:
    Dense, ReLU, quantizers, a wide accumulator, host prologue/epilogue)."""
    rng = np.random.default_rng(5)
    g = mlp(rng)
    info, _ = compile_and_check(g, rng.normal(0, 4, (100, 12)).astype(np.float32), tmp_path,
                                {"hls4ml": {"backend": "Catapult"}})
    prj = tmp_path / "hls4ml_prj"
    assert info["backend"] == "Catapult" and (prj / "firmware" / "ac_types").is_dir()
    assert "ac_fixed" in (prj / "firmware" / "defines.h").read_text()


def test_catapult_refuses_a_layer_whose_types_it_changes(cnn_graph, tmp_path):
    """Catapult's optimizers re-type pooling accumulators (hls4ml 1.3): a wider max-pool accumulator
    is accepted (the maximum of exactly held values is the same), an average pool's is refused
    naming the layer, never built with types other than the reference's."""
    g, _ = cnn_graph
    with pytest.raises(CompileError, match="hls4ml changed precision accum of layer 'ap3'"):
        Hls4mlBackend().emit(g, {"hls4ml": {"backend": "Catapult"}}, tmp_path)


def test_catapult_conv_maxpool(tmp_path):
    """Conv2D -> ReLU/quantize -> max pooling (its accumulator widened by Catapult: accepted) ->
    flatten -> dense, the digits-CNN pattern, on Catapult: the C simulation equals the reference."""
    rng = np.random.default_rng(12)
    b = GraphBuilder("cmp")
    x = b.input("x", (8, 8, 1), T("ufixed<5,1,RND_CONV,SAT>"))
    c = b.add("c1", "Conv", [x], attrs={"kernel": (3, 3), "strides": (1, 1), "pads": (1, 1, 1, 1)},
              params={"weight": _c(rng, -16, 16, (3, 3, 1, 6), "fixed<6,1>"), "bias": _c(rng, -8, 8, 6, "fixed<5,0>")})
    h = b.add("r1", "Relu", [c])
    q = b.add("q1", "Quantize", [h], attrs={"to": T("ufixed<6,2,RND_CONV,SAT>")})
    mp = b.add("mp", "MaxPool", [q], attrs={"kernel": (2, 2), "strides": (2, 2)})          # (4,4,6)
    fl = b.add("fl", "Reshape", [mp], attrs={"shape": (96,)})
    fc = b.add("fc", "Dense", [fl], params={"weight": _c(rng, -16, 16, (96, 10), "fixed<6,1>")})
    b.output(fc)
    g = b.build()
    X = rng.uniform(0, 1, (30, 8, 8, 1)).astype(np.float32)
    info, _ = compile_and_check(g, X, tmp_path, {"hls4ml": {"backend": "Catapult"}})
    assert info["backend"] == "Catapult"
