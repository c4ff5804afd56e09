"""The TVM library's Softmax of fixed-point codes (backends/tvm/softmax_lut.py) equals the reference
kernel bit for bit: the summation order against NumPy's own ``np.add.reduce``, the exp table against
NumPy's ``np.exp`` on the reference's own arguments, and compiled libraries against the reference
interpreter at several types, class counts and batch sizes (including rows whose exp underflows)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import qdeploy
from qdeploy.backends.tvm.softmax_lut import MAX_TABLE, exp_table, library_softmax, numpy_sum_order
from qdeploy.compiler import reference as refi
from qdeploy.compiler.ir import Const, GraphBuilder, parse_type
from qdeploy.compiler.ir.types import FLOAT32
from qdeploy.runtime import CompiledModel


@pytest.mark.parametrize("shape", [(40000, 5), (3000, 9), (300, 16), (50, 127), (20, 128), (20, 129), (10, 300),
                                   (7, 4, 3, 10), (2, 1000)])
def test_sum_order_is_numpys(shape):
    """The expression tree sums in np.add.reduce's order over a contiguous last axis (a left fold
    below 8 terms, NumPy's pairwise scheme above): equal bit for bit on values of wildly different
    magnitudes, where any other order differs."""
    rng = np.random.default_rng(sum(shape))
    x = (rng.random(shape) * np.exp(rng.standard_normal(shape) * 4)).astype(np.float32)
    want = np.add.reduce(x, axis=-1)
    cols = [x[..., j] for j in range(shape[-1])]
    got = numpy_sum_order(cols, lambda a, b: a + b)
    assert got.dtype == np.float32 and np.array_equal(got, want)
    # and a plain left fold is a different order from 8 terms on (so the test can fail)
    if shape[-1] >= 8:
        fold = cols[0]
        for c in cols[1:]:
            fold = fold + c
        assert not np.array_equal(fold, want)


@pytest.mark.parametrize("tstr", ["fixed<8,3>", "ufixed<6,2>", "fixed<16,5>", "fixed<12,14>", "fixed<10,-2>",
                                  "fixed<24,20>"])
def test_exp_table_is_numpys_exp_of_the_reference_arguments(tstr):
    """Every table entry is NumPy's float32 exp of the value ``x - max`` the reference forms (both
    rounded to float32 first), computed on small arrays the way the reference does per batch."""
    t = parse_type(tstr)
    lut = exp_table(t)
    assert lut is not None and lut.dtype == np.float32 and len(lut) <= MAX_TABLE
    rng = np.random.default_rng(0)
    lo, hi = int(t.min_code), int(t.max_code)
    codes = rng.integers(lo, hi + 1, (64, 7))
    codes[:, 0] = hi  # the largest spread k = hi - lo occurs
    codes[0, 1:] = lo
    x = np.ldexp(codes.astype(np.float64), -t.frac_bits).astype(np.float32)
    for row, c in zip(x, codes):
        e = np.exp(row - row.max())
        k = np.minimum(c.max() - c, len(lut) - 1)
        assert np.array_equal(lut[k], e), tstr


def test_exp_table_refuses_what_it_cannot_reproduce():
    """Wider than 24 bits (codes not exact in float32), a table over MAX_TABLE entries, a float
    input, a softmax over another axis: no table, the Softmax stays on the host."""
    assert exp_table(parse_type("fixed<25,5>")) is None
    assert exp_table(parse_type("fixed<20,2>")) is None  # 2**20 codes, exp underflows only at k ~ 2**24
    assert exp_table(FLOAT32) is None
    t = parse_type("fixed<8,3>")
    assert library_softmax(SimpleNamespace(op="Softmax", attrs={"axis": -1}), [t])
    assert not library_softmax(SimpleNamespace(op="Softmax", attrs={"axis": 1}), [t])
    assert not library_softmax(SimpleNamespace(op="Relu", attrs={}), [t])


def _graph(c: int, w_type: str, q_type: str | None):
    rng = np.random.default_rng(c)
    t_w = parse_type(w_type)
    b = GraphBuilder(f"sm{c}")
    x = b.input("x", (6,), FLOAT32)
    q = b.add("q", "Quantize", [x], attrs={"to": parse_type("fixed<8,3,RND_CONV,SAT>")})
    w = rng.integers(t_w.min_code, t_w.max_code + 1, (6, c))
    d = b.add("d", "Dense", [q], params={"weight": Const(w, t_w)})
    if q_type:
        d = b.add("r", "Quantize", [d], attrs={"to": parse_type(q_type)})
    b.output(b.add("sm", "Softmax", [d]))
    return b.build()


@pytest.mark.parametrize("c,w_type,q_type", [(2, "fixed<4,1>", None), (5, "fixed<6,1>", "fixed<16,5,RND,SAT>"),
                                             (10, "fixed<5,2>", "fixed<8,6,RND,SAT>"), (17, "fixed<8,4>", "fixed<12,8,RND,SAT>")])
def test_library_softmax_equals_reference(tmp_path, c, w_type, q_type):
    """Compiled for tvm-llvm, the Softmax runs in the library (no host node) and its outputs equal
    the reference interpreter's bit for bit at batch 1 (the static entry) and batch 37, on inputs
    that spread the logits far enough for exp to underflow in some rows."""
    g = _graph(c, w_type, q_type)
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(0, 2, (30, 6)), rng.normal(0, 40, (7, 6))]).astype(np.float32)
    qdeploy.compile(g, "tvm-llvm", tmp_path / "m", golden=x)
    m = CompiledModel.load(tmp_path / "m")
    assert m.manifest["backend"]["host_nodes"] == []
    want = refi.execute(g, {"x": x})[g.outputs[0]]
    t = g.value(g.nodes[-1].inputs[0]).dtype
    assert want.dtype == np.float32
    if (t.max_code - t.min_code) * 2.0 ** -t.frac_bits > 120:
        assert (want == 0).any()  # some exp underflowed (the table's last entry)
    assert np.array_equal(m.predict(x), want)
    for i in range(0, len(x), 5):
        assert np.array_equal(m.predict(x[i]), want[i:i + 1])  # one sample: a batch of one back
