"""Every IR op x every backend on tiny models, seeded random inputs, exact equality of codes.

The tiny models (:data:`CASES`) are merged side by side into ONE wide graph per backend and
compiled once (see :class:`~tests.conformance.conftest.Wide`), then each (case, backend) is its
own test on its slice of the outputs.  A case a backend rejects must be rejected with an
``UnsupportedError`` that names one of the case's nodes -- and only where listed in
``Case.rejects``; everything else must be bit-exact.
"""
from __future__ import annotations

import numpy as np
import pytest

from qdeploy.compiler import reference as ref
from qdeploy.compiler.errors import UnsupportedError
from qdeploy.compiler.ir import Const, parse_type
from qdeploy.compiler.ir.ops import OPS
from qdeploy.compiler.ir.types import FLOAT32

from .cases_batch_a import CASES_A
from .cases_batch_b import CASES_B
from .cases_threshold import CASES_THRESHOLD
from .conftest import Case, Wide, backend_params, compare, random_codes, random_feeds

T = parse_type


def W(rng, t, shape):
    t = T(t) if isinstance(t, str) else t
    return Const(random_codes(rng, t, shape), t)


# ------------------------------------------------------------------------------ cases
def _quantize_down(b, p, rng):
    x = b.input(p + "x", (12,), T("fixed<16,6>"))
    return [b.add(p + "q1", "Quantize", [x], attrs={"to": T("fixed<6,3,RND,SAT>")}),
            b.add(p + "q2", "Quantize", [x], attrs={"to": T("ufixed<5,2,RND_CONV,SAT_ZERO>")}),
            b.add(p + "q3", "Quantize", [x], attrs={"to": T("fixed<7,1,TRN_ZERO,SAT_SYM>")}),
            b.add(p + "q4", "Quantize", [x], attrs={"to": T("fixed<4,4,RND_MIN_INF,WRAP>")})]


def _quantize_up(b, p, rng):
    x = b.input(p + "x", (12,), T("fixed<8,2>"))
    return [b.add(p + "q", "Quantize", [x], attrs={"to": T("fixed<14,4>")}),
            b.add(p + "qn", "Quantize", [x], attrs={"to": T("fixed<12,0,RND_INF,WRAP>")})]


def _quantize_float(b, p, rng):
    # float -> fixed is the input cast (on the host for hls4ml); the fixed path continues on device
    x = b.input(p + "x", (10,), FLOAT32)
    q = b.add(p + "q", "Quantize", [x], attrs={"to": T("fixed<7,3,RND_INF,SAT>")})
    u = b.add(p + "u", "Quantize", [x], attrs={"to": T("ufixed<6,2,RND_ZERO,SAT>")})
    return [b.add(p + "aff", "Affine", [q], params={"scale": Const(np.array(3), T("int<3>"))}),
            b.add(p + "add", "Add", [q, u])]


def _sign_fixed(b, p, rng):
    x = b.input(p + "x", (10,), T("fixed<8,3>"))
    return [b.add(p + "s", "Sign", [x])]


def _sign_float(b, p, rng):
    x = b.input(p + "x", (10,), FLOAT32)
    s = b.add(p + "s", "Sign", [x])  # bipolar input quantizer
    return [b.add(p + "d", "Dense", [s], params={"weight": W(rng, "fixed<4,2>", (10, 3))})]


def _dense(b, p, rng):
    x = b.input(p + "x", (9,), T("fixed<8,2,RND_CONV,SAT>"))
    return [b.add(p + "d", "Dense", [x], params={"weight": W(rng, "fixed<5,1>", (9, 5)),
                                                 "bias": W(rng, "fixed<9,3>", (5,))})]


def _dense_unsigned(b, p, rng):
    x = b.input(p + "x", (7,), T("ufixed<6,3>"))
    return [b.add(p + "d", "Dense", [x], params={"weight": W(rng, "int<3>", (7, 4))})]


def _dense_rank2(b, p, rng):
    x = b.input(p + "x", (4, 6), T("fixed<6,2>"))
    return [b.add(p + "d", "Dense", [x], params={"weight": W(rng, "fixed<4,0>", (6, 3)),
                                                 "bias": W(rng, "fixed<6,2>", (3,))})]


def _dense_rank3(b, p, rng):
    x = b.input(p + "x", (3, 4, 5), T("fixed<7,3>"))
    return [b.add(p + "d", "Dense", [x], params={"weight": W(rng, "fixed<3,1>", (5, 2))})]


def _conv2d(b, p, rng):
    x = b.input(p + "x", (7, 7, 3), T("fixed<8,3,RND_CONV,SAT_SYM>"))
    return [b.add(p + "c", "Conv", [x], attrs={"kernel": (3, 3), "strides": (2, 2), "pads": (1, 0, 1, 2)},
                  params={"weight": W(rng, "fixed<5,1>", (3, 3, 3, 4)), "bias": W(rng, "fixed<10,2>", (4,))})]


def _conv2d_grouped(b, p, rng):
    x = b.input(p + "x", (6, 6, 4), T("fixed<6,2>"))
    return [b.add(p + "c", "Conv", [x], attrs={"kernel": (3, 3), "groups": 2, "pads": (1, 1, 1, 1)},
                  params={"weight": W(rng, "fixed<4,1>", (3, 3, 2, 6))})]


def _conv2d_depthwise(b, p, rng):
    x = b.input(p + "x", (6, 6, 3), T("ufixed<5,2>"))
    return [b.add(p + "c", "Conv", [x], attrs={"kernel": (2, 2), "groups": 3, "strides": (1, 2)},
                  params={"weight": W(rng, "fixed<4,2>", (2, 2, 1, 3))})]


def _conv1d(b, p, rng):
    x = b.input(p + "x", (11, 3), T("fixed<6,2>"))
    return [b.add(p + "c", "Conv", [x], attrs={"kernel": (3,), "strides": (2,), "pads": (1, 2)},
                  params={"weight": W(rng, "fixed<5,1>", (3, 3, 4)), "bias": W(rng, "fixed<5,1>", (4,))})]


def _conv3d(b, p, rng):
    x = b.input(p + "x", (3, 3, 3, 2), T("fixed<6,1>"))
    return [b.add(p + "c", "Conv", [x], attrs={"kernel": (2, 2, 2)},
                  params={"weight": W(rng, "fixed<3,1>", (2, 2, 2, 2, 2))})]


def _relu(b, p, rng):
    x = b.input(p + "x", (12,), T("fixed<7,3>"))
    return [b.add(p + "r", "Relu", [x])]


def _relu_quantize(b, p, rng):
    # Relu -> Quantize with a single consumer: hls4ml fuses it into one relu layer
    x = b.input(p + "x", (12,), T("fixed<12,5>"))
    r = b.add(p + "r", "Relu", [x])
    return [b.add(p + "q", "Quantize", [r], attrs={"to": T("ufixed<5,3,RND,SAT>")})]


def _relu_unsigned(b, p, rng):
    x = b.input(p + "x", (3, 3, 2), T("ufixed<6,2>"))
    d = b.add(p + "d", "Dense", [x], params={"weight": W(rng, "fixed<3,1>", (2, 2))})
    return [b.add(p + "r", "Relu", [d])]


def _leaky_relu(b, p, rng):
    x = b.input(p + "x", (12,), T("fixed<7,3>"))
    return [b.add(p + "lr", "LeakyRelu", [x], attrs={"shift": 3}),
            b.add(p + "lr0", "LeakyRelu", [x], attrs={"shift": 0})]


def _leaky_relu_map(b, p, rng):
    # after a Conv (signed accumulator), then a Quantize that rounds the extra fraction bits away
    x = b.input(p + "x", (4, 4, 2), T("ufixed<5,2>"))
    c = b.add(p + "c", "Conv", [x], attrs={"kernel": (3, 3)}, params={"weight": W(rng, "fixed<4,1>", (3, 3, 2, 3))})
    lr = b.add(p + "lr", "LeakyRelu", [c], attrs={"shift": 2})
    return [b.add(p + "q", "Quantize", [lr], attrs={"to": T("fixed<6,3,RND_CONV,SAT>")})]


def _leaky_relu_float(b, p, rng):
    # float LeakyRelu in a float epilogue (host for hls4ml)
    x = b.input(p + "x", (6,), T("fixed<6,2>"))
    d = b.add(p + "d", "Dense", [x], params={"weight": W(rng, "fixed<4,1>", (6, 4))})
    fd = b.add(p + "fd", "Dense", [d], params={"weight": Const(rng.standard_normal((4, 3)), FLOAT32)})
    return [d, b.add(p + "lr", "LeakyRelu", [fd], attrs={"shift": 1})]


def _float_quant(b, p, rng):
    # FP8 e4m3 (power-of-two scale, saturating) then the lossless cast onto its fixed-point grid and a
    # Dense on device; e5m2 with a non-power-of-two scale and inf on overflow as a float output
    x = b.input(p + "x", (8,), FLOAT32)
    e4 = b.add(p + "e4m3", "FloatQuant", [x], attrs={"exponent_bits": 4, "mantissa_bits": 3, "exponent_bias": 7,
                                                     "scale": 0.5})
    g = b.add(p + "grid", "Quantize", [e4], attrs={"to": T("fixed<19,9,RND_CONV,SAT>")})
    e5 = b.add(p + "e5m2", "FloatQuant", [x], attrs={"exponent_bits": 5, "mantissa_bits": 2, "exponent_bias": 15,
                                                     "scale": 0.0137, "saturation": False, "has_inf": True})
    return [b.add(p + "d", "Dense", [g], params={"weight": W(rng, "fixed<4,1>", (8, 3))}), e4, e5]


def _topk(b, p, rng):
    # label select after a narrow Dense (many ties among 4-bit scores: lower index first), and on floats
    x = b.input(p + "x", (6,), T("fixed<3,2>"))
    d = b.add(p + "d", "Dense", [x], params={"weight": W(rng, "int<2>", (6, 9))})
    f = b.add(p + "f", "Affine", [d], params={"scale": Const(np.float32(0.75), FLOAT32)})
    return [d, b.add(p + "top3", "TopK", [d], attrs={"k": 3}), b.add(p + "low2", "TopK", [f], attrs={"k": 2,
                                                                                               "largest": False})]


def _add(b, p, rng):
    x = b.input(p + "x", (10,), T("fixed<8,2>"))
    y = b.input(p + "y", (10,), T("ufixed<6,4>"))
    return [b.add(p + "a", "Add", [x, y])]


def _add_map(b, p, rng):
    x = b.input(p + "x", (4, 4, 3), T("fixed<6,3>"))
    y = b.add(p + "y", "Quantize", [x], attrs={"to": T("fixed<4,1,RND,SAT>")})
    return [b.add(p + "a", "Add", [x, y])]


def _add_broadcast(b, p, rng):
    x = b.input(p + "x", (4, 6), T("fixed<8,1>"))
    y = b.input(p + "y", (1, 6), T("fixed<6,4>"))
    return [b.add(p + "a", "Add", [x, y])]


def _mul(b, p, rng):
    x = b.input(p + "x", (10,), T("fixed<7,2>"))
    y = b.input(p + "y", (10,), T("ufixed<5,1>"))
    return [b.add(p + "m", "Mul", [x, y])]


def _mul_broadcast(b, p, rng):
    x = b.input(p + "x", (4, 6), T("fixed<7,2>"))
    y = b.input(p + "y", (6,), T("fixed<5,5>"))
    return [b.add(p + "m", "Mul", [x, y])]


def _affine(b, p, rng):
    x = b.input(p + "x", (5, 4), T("fixed<8,1,RND_CONV,SAT>"))
    return [b.add(p + "af", "Affine", [x], params={"scale": W(rng, "fixed<7,2>", (4,)),
                                                   "bias": W(rng, "fixed<8,0>", (4,))})]


def _affine_scalar(b, p, rng):
    x = b.input(p + "x", (9,), T("ufixed<6,2>"))
    return [b.add(p + "af", "Affine", [x], params={"scale": Const(np.array(-3), T("int<3>"))}),
            b.add(p + "ab", "Affine", [x], params={"bias": W(rng, "fixed<4,4>", (9,))})]


def _concat(b, p, rng):
    x = b.input(p + "x", (6,), T("fixed<8,2>"))
    y = b.input(p + "y", (4,), T("ufixed<5,3>"))
    return [b.add(p + "c", "Concat", [x, y], attrs={"axis": -1})]


def _concat3_map(b, p, rng):
    x = b.input(p + "x", (3, 3, 2), T("fixed<6,2>"))
    y = b.input(p + "y", (3, 3, 1), T("fixed<5,4>"))
    z = b.add(p + "z", "Relu", [x])
    return [b.add(p + "c", "Concat", [x, y, z], attrs={"axis": -1})]


def _concat_axis0(b, p, rng):
    x = b.input(p + "x", (2, 5), T("fixed<6,1>"))
    y = b.input(p + "y", (3, 5), T("fixed<7,3>"))
    return [b.add(p + "c", "Concat", [x, y], attrs={"axis": 0})]


def _reshape(b, p, rng):
    x = b.input(p + "x", (3, 4, 2), T("fixed<6,2>"))
    f = b.add(p + "flat", "Reshape", [x], attrs={"shape": (24,)})
    return [b.add(p + "d", "Dense", [f], params={"weight": W(rng, "fixed<3,1>", (24, 3))})]


def _reshape_unflatten(b, p, rng):
    x = b.input(p + "x", (12,), T("fixed<6,2>"))
    d = b.add(p + "d", "Dense", [x], params={"weight": W(rng, "fixed<3,1>", (12, 12))})
    return [b.add(p + "r", "Reshape", [d], attrs={"shape": (3, 4)})]


def _transpose(b, p, rng):
    x = b.input(p + "x", (4, 6), T("fixed<8,3>"))
    q = b.add(p + "q", "Quantize", [x], attrs={"to": T("fixed<6,3,RND,SAT>")})
    return [b.add(p + "t", "Transpose", [q], attrs={"perm": (1, 0)})]


def _transpose3(b, p, rng):
    x = b.input(p + "x", (2, 3, 4), T("fixed<8,3>"))
    r = b.add(p + "r", "Relu", [x])
    return [b.add(p + "t", "Transpose", [r], attrs={"perm": (2, 0, 1)})]


def _maxpool2d(b, p, rng):
    x = b.input(p + "x", (7, 7, 3), T("fixed<7,2>"))
    return [b.add(p + "mp", "MaxPool", [x], attrs={"kernel": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1)}),
            b.add(p + "mp2", "MaxPool", [x], attrs={"kernel": (2, 2), "strides": (2, 2)})]


def _maxpool1d(b, p, rng):
    x = b.input(p + "x", (10, 2), T("fixed<6,3>"))
    return [b.add(p + "mp", "MaxPool", [x], attrs={"kernel": (3,), "strides": (2,), "pads": (1, 1)})]


def _maxpool_unsigned(b, p, rng):
    x = b.input(p + "x", (6, 6, 2), T("ufixed<5,2>"))
    return [b.add(p + "mp", "MaxPool", [x], attrs={"kernel": (2, 2), "strides": (1, 1)})]


def _maxpool_unsigned_padded(b, p, rng):
    x = b.input(p + "x", (6, 6, 2), T("ufixed<5,2>"))
    return [b.add(p + "mp", "MaxPool", [x], attrs={"kernel": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1)})]


def _avgpool2d(b, p, rng):
    x = b.input(p + "x", (6, 6, 3), T("fixed<7,3,RND_CONV,SAT_SYM>"))
    return [b.add(p + "ap2", "AvgPool", [x], attrs={"kernel": (2, 2), "strides": (2, 2)}),
            b.add(p + "ap3", "AvgPool", [x], attrs={"kernel": (3, 3), "strides": (3, 3)})]


def _avgpool1d(b, p, rng):
    x = b.input(p + "x", (12, 3), T("ufixed<5,2>"))
    y = b.input(p + "y", (12, 2), T("fixed<6,1>"))
    return [b.add(p + "ap", "AvgPool", [x], attrs={"kernel": (3,), "strides": (2,)}),
            b.add(p + "ap5", "AvgPool", [y], attrs={"kernel": (5,), "strides": (5,)})]


def _gap2d(b, p, rng):
    x = b.input(p + "x", (3, 3, 4), T("fixed<8,3>"))  # 9 elements: not a power of two
    return [b.add(p + "g", "GlobalAvgPool", [x])]


def _gap1d(b, p, rng):
    x = b.input(p + "x", (8, 3), T("ufixed<6,2>"))
    y = b.input(p + "y", (6, 2), T("fixed<6,3>"))
    return [b.add(p + "g", "GlobalAvgPool", [x]), b.add(p + "g6", "GlobalAvgPool", [y])]


def _softmax(b, p, rng):
    # fixed core, float epilogue (host for hls4ml)
    x = b.input(p + "x", (8,), T("fixed<8,2>"))
    d = b.add(p + "d", "Dense", [x], params={"weight": W(rng, "fixed<4,1>", (8, 5))})
    q = b.add(p + "q", "Quantize", [d], attrs={"to": T("fixed<8,3,RND,SAT>")})
    return [q, b.add(p + "sm", "Softmax", [q])]


def _float_epilogue(b, p, rng):
    x = b.input(p + "x", (6,), T("fixed<6,2>"))
    d = b.add(p + "d", "Dense", [x], params={"weight": W(rng, "fixed<4,1>", (6, 4))})
    r = b.add(p + "r", "Relu", [d])
    return [r, b.add(p + "fd", "Dense", [r], params={"weight": Const(rng.standard_normal((4, 3)), FLOAT32)})]


HLS = ("hls4ml",)
CASES = [
    Case("quantize_down", "Quantize", _quantize_down),
    Case("quantize_up", "Quantize", _quantize_up),
    Case("quantize_float", "Quantize", _quantize_float),
    Case("sign_fixed", "Sign", _sign_fixed),
    Case("sign_float", "Sign", _sign_float),
    Case("dense", "Dense", _dense),
    Case("dense_unsigned", "Dense", _dense_unsigned),
    Case("dense_rank2", "Dense", _dense_rank2),
    Case("dense_rank3", "Dense", _dense_rank3),
    Case("conv2d", "Conv", _conv2d),
    Case("conv2d_grouped", "Conv", _conv2d_grouped),
    Case("conv2d_depthwise", "Conv", _conv2d_depthwise),
    Case("conv1d", "Conv", _conv1d),
    Case("relu", "Relu", _relu),
    Case("relu_quantize", "Relu", _relu_quantize),
    Case("relu_unsigned", "Relu", _relu_unsigned),
    Case("leaky_relu", "LeakyRelu", _leaky_relu),
    Case("leaky_relu_map", "LeakyRelu", _leaky_relu_map),
    Case("leaky_relu_float", "LeakyRelu", _leaky_relu_float),
    Case("float_quant", "FloatQuant", _float_quant),
    Case("topk", "TopK", _topk),
    Case("add", "Add", _add),
    Case("add_map", "Add", _add_map),
    Case("add_broadcast", "Add", _add_broadcast),
    Case("mul", "Mul", _mul),
    Case("mul_broadcast", "Mul", _mul_broadcast),
    Case("affine", "Affine", _affine),
    Case("affine_scalar", "Affine", _affine_scalar),
    Case("concat", "Concat", _concat),
    Case("concat3_map", "Concat", _concat3_map),
    Case("concat_axis0", "Concat", _concat_axis0),
    Case("reshape", "Reshape", _reshape),
    Case("reshape_unflatten", "Reshape", _reshape_unflatten),
    Case("transpose", "Transpose", _transpose),
    Case("transpose3", "Transpose", _transpose3),
    Case("maxpool2d", "MaxPool", _maxpool2d),
    Case("maxpool1d", "MaxPool", _maxpool1d),
    Case("maxpool_unsigned", "MaxPool", _maxpool_unsigned),
    Case("maxpool_unsigned_padded", "MaxPool", _maxpool_unsigned_padded),
    Case("avgpool2d", "AvgPool", _avgpool2d),
    Case("avgpool1d", "AvgPool", _avgpool1d),
    Case("gap2d", "GlobalAvgPool", _gap2d),
    Case("gap1d", "GlobalAvgPool", _gap1d),
    Case("softmax", "Softmax", _softmax),
    Case("float_epilogue", "Dense", _float_epilogue),
] + CASES_A + CASES_THRESHOLD + CASES_B
CASE_IDS = [c.id for c in CASES]
BY_ID = {c.id: c for c in CASES}


def test_every_op_has_a_case():
    assert set(OPS) <= {c.op for c in CASES}, f"ops without a conformance case: {set(OPS) - {c.op for c in CASES}}"
    assert len(set(CASE_IDS)) == len(CASE_IDS)


@pytest.fixture(scope="module")
def wide(compiled):
    return Wide("ops", CASES, compiled, seed=7)


@pytest.fixture(scope="module")
def run_cache():
    return {}


def _run(wide, run_cache, backend, batch):
    """Outputs of the wide graph for ``backend`` and the reference, one run per (backend, batch)."""
    key = (backend, batch)
    if key not in run_cache:
        rejected, comp, outs = wide.get(backend)
        feeds = random_feeds(comp.graph, np.random.default_rng(100 + batch), batch)
        run_cache[key] = (rejected, comp, outs, comp(feeds), ref.execute(comp.graph, feeds, codes=True))
    return run_cache[key]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", CASE_IDS)
def test_op_exact(case, backend, batch, wide, run_cache):
    rejected, comp, outs, got, want = _run(wide, run_cache, backend, batch)
    c = BY_ID[case]
    if case in rejected:
        err = rejected[case]
        assert backend in c.rejects, f"{backend} unexpectedly rejects {case}: {err}"
        assert isinstance(err, UnsupportedError)
        assert err.node and err.node.startswith(f"{case}__"), f"error does not name a node of {case}: {err}"
        assert f"node '{err.node}'" in str(err)
        return
    assert backend not in c.rejects or backend == "reference", \
        f"{backend} now compiles {case}: drop it from Case.rejects"
    bad = compare("ops", case, backend, comp.graph, got, want, outputs=outs[case])
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("backend", backend_params())
def test_wide_build_reused(backend, wide):
    """The wide model compiled for the backend really contains every accepted case."""
    rejected, comp, outs = wide.get(backend)
    assert set(outs) | set(rejected) == set(CASE_IDS)
    assert set(rejected) == {c.id for c in CASES if backend in c.rejects and backend != "reference"}


@pytest.mark.parametrize("backend", backend_params(("tvm-llvm", "hls4ml")))
def test_conv3d_rejected_naming_node(backend):
    """3-D convolution passes the IR verifier, but no target has it: UnsupportedError naming it."""
    g = Case("conv3d", "Conv", _conv3d).graph()
    from .conftest import emit_only
    err = emit_only(backend, g)
    assert isinstance(err, UnsupportedError) and err.node == "conv3d__c", err


def test_conv3d_reference_names_node():
    g = Case("conv3d", "Conv", _conv3d).graph()
    feeds = random_feeds(g, np.random.default_rng(0), 2)
    with pytest.raises(UnsupportedError, match="conv3d__c"):
        ref.execute(g, feeds, codes=True)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", backend_params(("tvm-llvm",)))
def test_tvm_static_batch1_entry_exact(backend, wide):
    """The TVM library's static batch-1 entry ``main_b1`` (built by default; ``predict`` calls it
    for a batch of one through the thin path's positional call, host epilogue included) is exact
    on every accepted case, like ``main``."""
    rejected, comp, outs = wide.get(backend)
    fast = comp.fn.fast
    assert fast.entry1 is not None
    feeds = random_feeds(comp.graph, np.random.default_rng(101), 1)
    arrays = [np.ascontiguousarray(feeds[n], dtype=d) for n, d in zip(comp.fn.input_names, fast.input_dtypes)]
    res = fast(arrays, batch1=True)
    got = {o: (np.asarray(r, dtype=np.int64) if np.issubdtype(np.asarray(r).dtype, np.integer) else r)
           for o, r in zip(fast.outputs, res)}  # predict dequantizes codes of any integer dtype
    want = ref.execute(comp.graph, feeds, codes=True)
    bad = [b for case, o in outs.items() for b in compare("ops_b1", case, backend, comp.graph, got, want, outputs=o)]
    assert not bad, "\n".join(bad[:20])
