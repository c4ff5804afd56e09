"""The host epilogue's fast kernels (backends/tvm/host_kernels.py) equal the reference kernels bit
for bit: random and extreme codes over many fixed-point types (wide, narrow, unsigned, all-integer,
fraction-only), float inputs, scalar and per-channel scales and biases.  Oracle: the op's own
``OpSpec.reference``."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from qdeploy.backends.tvm.fastcall import epilogue_plan
from qdeploy.backends.tvm.host_kernels import fast_kernel
from qdeploy.compiler import reference as ref
from qdeploy.compiler.ir import FLOAT32, Const, GraphBuilder, parse_type as T
from qdeploy.compiler.ir.ops import get as get_op
from qdeploy.compiler.ir.types import FixedType


def _codes(rng, t: FixedType, shape):
    c = rng.integers(t.min_code, t.max_code, size=shape, endpoint=True)
    flat = c.reshape(-1)
    flat[: min(4, flat.size)] = [t.min_code, t.max_code, 0, 1][: min(4, flat.size)]
    return c


def _same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(a.view(np.uint32) if a.dtype == np.float32 else a,
                          b.view(np.uint32) if b.dtype == np.float32 else b)


types = st.builds(lambda w, i, s: T(f"{'fixed' if s else 'ufixed'}<{w},{i}>"),
                  st.integers(2, 40), st.integers(-8, 40), st.booleans())


@given(t=types, seed=st.integers(0, 2**16), n=st.sampled_from([1, 3, 8, 37]), c=st.integers(1, 20))
def test_softmax_equals_reference(t, seed, n, c):
    rng = np.random.default_rng(seed)
    b = GraphBuilder("s")
    x = b.input("x", (c,), t)
    b.output(b.add("sm", "Softmax", [x]))
    g = b.build()
    node = g.nodes[0]
    k = fast_kernel(node, [t], FLOAT32)
    assert k is not None
    a = _codes(rng, t, (n, c))
    _same(k([a]), get_op("Softmax").reference(node, [a], [t], FLOAT32))


@given(t=types, seed=st.integers(0, 2**16), per_channel=st.booleans(), bias=st.booleans())
def test_affine_float_equals_reference(t, seed, per_channel, bias):
    rng = np.random.default_rng(seed)
    c = 6
    b = GraphBuilder("a")
    x = b.input("x", (c,), t)
    shape = (c,) if per_channel else (1,)
    params = {"scale": Const(rng.uniform(-3, 3, shape).astype(np.float32), FLOAT32)}
    if bias:
        params["bias"] = Const(rng.uniform(-1, 1, shape).astype(np.float32), FLOAT32)
    b.output(b.add("af", "Affine", [x], params=params))
    g = b.build()
    node = g.nodes[0]
    out_t = g.value(node.output).dtype
    k = fast_kernel(node, [t], out_t)
    assert k is not None
    a = _codes(rng, t, (3, c))
    _same(k([a]), get_op("Affine").reference(node, [a], [t], out_t))


def test_float_input_and_no_fast_path_cases():
    """Float inputs take the fast path too; a type whose scaled values could be subnormal in
    float32 (more than 126 fraction bits) gets no fast kernel (the reference runs)."""
    rng = np.random.default_rng(0)
    b = GraphBuilder("f")
    x = b.input("x", (7,), FLOAT32)
    b.output(b.add("sm", "Softmax", [x]))
    g = b.build()
    for n in (4, 12):  # the row maximum by reduce (small batch) and column by column
        a = rng.normal(0, 30, (n, 7)).astype(np.float32)
        a[0, :3] = [np.inf, -np.inf, 0.0]
        a[1, 2] = np.nan
        a[2, :] = -0.0
        a[3, 4] = -np.inf
        with np.errstate(invalid="ignore"):
            _same(fast_kernel(g.nodes[0], [FLOAT32], FLOAT32)([a]),
                  get_op("Softmax").reference(g.nodes[0], [a], [FLOAT32], FLOAT32))
    wide = FixedType(8, -130, True)  # 138 fraction bits
    assert fast_kernel(g.nodes[0], [wide], FLOAT32) is None


@pytest.mark.parametrize("tstr", ["fixed<16,5>", "fixed<33,8>", "ufixed<4,4>"])
def test_epilogue_plan_equals_reference_execute(tstr):
    """A two-step epilogue (per-channel scale, then softmax) run by epilogue_plan equals the
    reference interpreter on the same graph."""
    rng = np.random.default_rng(1)
    t = T(tstr)
    b = GraphBuilder("e")
    x = b.input("x", (5,), t)
    h = b.add("af", "Affine", [x], params={"scale": Const(rng.uniform(0.1, 2, (5,)).astype(np.float32), FLOAT32)})
    b.output(b.add("sm", "Softmax", [h]))
    g = b.build()
    a = _codes(rng, t, (9, 5))
    got = epilogue_plan(g)({"x": a})
    want = ref.execute(g, {"x": a}, codes=True)
    _same(got[g.outputs[0]], want[g.outputs[0]])
