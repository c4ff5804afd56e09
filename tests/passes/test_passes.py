import numpy as np
import pytest

from qdeploy.compiler import reference as ref
from qdeploy.compiler.errors import UnsupportedError
from qdeploy.compiler.ir import Const, GraphBuilder, parse_type
from qdeploy.compiler.ir.types import FixedType, FloatType
from qdeploy.passes import (PassContext, PassManager, affine_to_fixed, dce, default_pipeline, fold_affine_chains,
                            fold_batchnorm, partition, quantize_inputs, run_partitioned)


def _bnn(rng, k=32, n=16, two_bit=False):
    """TFC-like: Sign input -> Dense(+-1) -> float BN -> Sign/Quant -> Dense -> float scale."""
    b = GraphBuilder("bnn")
    x = b.input("x", (k,), FloatType())
    h = b.add("in_sign", "Sign", [x])
    w1 = Const(rng.choice([-1, 1], (k, n)), FixedType(2, 2, True))
    h = b.add("fc1", "Dense", [h], params={"weight": w1})
    s = Const(rng.uniform(0.05, 0.3, n).astype(np.float32) * rng.choice([-1, 1], n), FloatType())
    t = Const(rng.normal(0, 1, n).astype(np.float32), FloatType())
    h = b.add("bn1", "Affine", [h], params={"scale": s, "bias": t})
    if two_bit:
        h = b.add("act1", "Quantize", [h], attrs={"to": parse_type("fixed<2,2,RND_CONV,SAT_SYM>")})
    else:
        h = b.add("act1", "Sign", [h])
    w2 = Const(rng.choice([-1, 1], (n, 10)), FixedType(2, 2, True))
    h = b.add("fc2", "Dense", [h], params={"weight": w2})
    h = b.add("tn", "Affine", [h], params={"scale": Const(np.float32([0.04]), FloatType()),
                                          "bias": Const(np.float32([-1.1]), FloatType())})
    b.output(h)
    return b.build()


@pytest.mark.parametrize("two_bit", [False, True])
def test_affine_to_fixed_is_exact_on_all_codes(rng, two_bit):
    g = _bnn(rng, two_bit=two_bit)
    with PassContext() as ctx:
        g2 = affine_to_fixed(g)
    notes = ctx.notes
    assert isinstance(g2.node("bn1").params["scale"].dtype, FixedType)
    assert isinstance(g2.node("bn1").params["bias"].dtype, FixedType)
    assert any("verified" in s for s in notes)
    # every reachable accumulator value: feed the first Dense output range directly through a sub-check
    x = rng.normal(0, 1, (500, 32)).astype(np.float32)
    a = ref.execute(g, x, keep=True)
    b = ref.execute(g2, x, keep=True)
    assert np.array_equal(a["act1"], b["act1"])
    assert np.array_equal(a["tn"], b["tn"])


def test_partition_host_epilogue(rng):
    g = affine_to_fixed(_bnn(rng))
    part = partition(g)
    assert [n.op for n in part.prologue.nodes] == ["Sign"]
    assert part.epilogue is not None and [n.name for n in part.epilogue.nodes] == ["tn"]
    assert all(isinstance(v.dtype, FixedType) for v in part.device.input_values() + part.device.output_values())
    x = rng.normal(0, 1, (20, 32)).astype(np.float32)
    feeds = {"x": x}
    out = run_partitioned(part, g, feeds, lambda f: ref.execute(part.device, f, codes=True))
    assert np.array_equal(out["tn"], ref.execute(g, x)["tn"])


def test_partition_rejects_float_inside_datapath(rng):
    b = GraphBuilder("bad")
    x = b.input("x", (4,), parse_type("fixed<8,1>"))
    h = b.add("fc", "Dense", [x], params={"weight": Const(rng.integers(-3, 3, (4, 4)), parse_type("fixed<3,1>"))})
    h = b.add("sm", "Softmax", [h])
    h = b.add("q", "Quantize", [h], attrs={"to": parse_type("ufixed<8,0>")})
    h = b.add("fc2", "Dense", [h], params={"weight": Const(rng.integers(-3, 3, (4, 2)), parse_type("fixed<3,1>"))})
    b.output(h)
    with pytest.raises(UnsupportedError, match="node 'sm'"):
        partition(b.build())


def test_quantize_inputs_auto_type(rng):
    b = GraphBuilder("jet")
    x = b.input("x", (16,), FloatType())
    h = b.add("fc", "Dense", [x], params={"weight": Const(rng.integers(-32, 32, (16, 5)), parse_type("fixed<6,1>"))})
    b.output(h)
    g = b.build()
    data = np.round(rng.uniform(-1, 1, (64, 16)) * 2 ** 16) / 2 ** 16
    with PassContext() as ctx:
        g2 = quantize_inputs(g, calibration={"x": data})
    assert ctx.notes == ["x: input type fixed<17,1,RND_CONV,SAT> represents every calibration input exactly"]
    q = g2.nodes[0]
    assert q.op == "Quantize" and q.attrs["to"].frac_bits == 16
    assert np.array_equal(ref.run(g2, data), data @ g.node("fc").params["weight"].real())
    g3 = quantize_inputs(g, input_type="fixed<16,6,RND_CONV,SAT>")
    assert str(g3.nodes[0].attrs["to"]) == "fixed<16,6,RND_CONV,SAT>"


def test_fold_batchnorm_float_and_manager(rng):
    b = GraphBuilder("f")
    x = b.input("x", (6, 6, 2), FloatType())
    w = Const(rng.normal(size=(3, 3, 2, 4)).astype(np.float32), FloatType())
    h = b.add("c", "Conv", [x], attrs={"kernel": (3, 3)}, params={"weight": w})
    h = b.add("bn", "Affine", [h], params={"scale": Const(rng.uniform(0.5, 2, 4), FloatType()),
                                          "bias": Const(rng.normal(size=4), FloatType())})
    h = b.add("id", "Affine", [h], params={"scale": Const(np.float32([1.0]), FloatType())})
    h = b.add("r", "Relu", [h])
    b.output(h)
    g = b.build()
    pm = PassManager([dce, fold_batchnorm, fold_affine_chains])
    g2 = pm.run(g)
    assert [n.op for n in g2.nodes] == ["Conv", "Relu"]
    x = rng.normal(size=(3, 6, 6, 2)).astype(np.float32)
    np.testing.assert_allclose(ref.run(g2, x), ref.run(g, x), rtol=1e-5, atol=1e-5)
    assert [r.name for r in pm.records] == ["dce", "fold_batchnorm", "fold_affine_chains"]


def test_default_pipeline_runs(rng):
    g = _bnn(rng)
    g2 = PassManager(default_pipeline()).run(g)
    x = rng.normal(0, 1, (50, 32)).astype(np.float32)
    np.testing.assert_array_equal(ref.run(g2, x), ref.run(g, x))
