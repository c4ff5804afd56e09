"""hls4ml translations of batch-B ops: refusals where hls4ml's C++ is not exact (checked without
a C-simulation build: ``emit`` refuses before anything compiles)."""
from __future__ import annotations

import pytest

from qdeploy.backends.hls4ml import Hls4mlBackend
from qdeploy.backends.hls4ml.translate import resize_index_ok
from qdeploy.compiler.errors import UnsupportedError
from qdeploy.compiler.ir import GraphBuilder, parse_type


def _resize_graph(length, s):
    b = GraphBuilder("rs")
    x = b.input("x", (length, 1), parse_type("fixed<6,2>"))
    b.output(b.add("up", "Resize", [x], attrs={"scales": (s,)}))
    return b.build()


def test_resize_index_formula_brute_force():
    # hls4ml's index ((o * ratio) >> 16), ratio = ((L << 16) / (s L)) + 1, against o // s
    def brute(L, s):
        ratio = ((L << 16) // (s * L)) + 1
        return all(((o * ratio) >> 16) == o // s for o in range(s * L))
    for L, s in ((4, 2), (7, 3), (100, 5), (2396, 7), (3595, 5)):
        assert resize_index_ok(L, s) == brute(L, s)
    assert resize_index_ok(64, 7) and not resize_index_ok(2396, 7)


def test_resize_refused_where_hls4ml_index_is_not_a_repetition(tmp_path):
    with pytest.raises(UnsupportedError, match="node 'up'.*resize_nearest"):
        Hls4mlBackend().emit(_resize_graph(2396, 7), {}, tmp_path / "p")
