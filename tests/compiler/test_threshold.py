"""The MultiThreshold op: type rule checks and the reference kernel against a direct count."""
from __future__ import annotations

import numpy as np
import pytest

from qdeploy.compiler import reference as ref
from qdeploy.compiler.errors import VerifyError
from qdeploy.compiler.ir import Const, GraphBuilder, parse_type


def _graph(thresholds, base, sign, to="int<4>", xt="fixed<8,4>"):
    t_in = parse_type(xt)
    tt = parse_type(f"fixed<{t_in.width + 2},{t_in.int_bits + 2}>")
    b = GraphBuilder("mt")
    x = b.input("x", (3, 2), t_in)
    y = b.add("mt", "MultiThreshold", [x], attrs={"to": parse_type(to)},
               params={"thresholds": Const(np.asarray(thresholds), tt),
                       "base": Const(np.asarray(base), parse_type("int<8>")),
                       "sign": Const(np.asarray(sign), parse_type("int<2>"))})
    b.output(y)
    return b.build()


def test_reference_counts_thresholds_per_channel_with_sign():
    g = _graph([[-4, 0, 5], [1, 2, 200]], base=[-1, 3], sign=[1, -1])
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, size=(50, 3, 2))
    y = ref.execute(g, {"x": x}, codes=True)[g.outputs[0]]
    want0 = -1 + (x[..., 0:1] >= np.array([-4, 0, 5])).sum(-1)
    want1 = 3 - (x[..., 1:2] >= np.array([1, 2, 200])).sum(-1)
    assert np.array_equal(y[..., 0], want0)
    assert np.array_equal(y[..., 1], want1)


def test_unsorted_thresholds_and_out_of_range_codes_are_refused():
    with pytest.raises(VerifyError, match="sorted"):
        _graph([[3, 1]], base=[0], sign=[1])
    with pytest.raises(VerifyError, match="do not fit"):
        _graph([[1, 2, 3]], base=[6], sign=[1], to="int<4>")
