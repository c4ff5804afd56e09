"""``fold_lookup_quantize``: a float-table Lookup and its Quantize become one fixed-table Lookup
with the same codes for every input code (compared against the unfolded reference)."""
from __future__ import annotations

import numpy as np

from qdeploy.compiler import reference as ref
from qdeploy.compiler.ir import Const, GraphBuilder, parse_type
from qdeploy.compiler.ir.types import FLOAT32
from qdeploy.passes import PassManager, fold_lookup_quantize


def _graph(extra_consumer=False):
    b = GraphBuilder("lk")
    x = b.input("x", (32,), parse_type("fixed<5,2>"))
    tab = (1.0 / (1.0 + np.exp(-np.arange(-16, 16) / 8.0))).astype(np.float32)
    lt = b.add("lt", "Lookup", [x], attrs={"fn": "Sigmoid"}, params={"table": Const(tab, FLOAT32)})
    q = b.add("q", "Quantize", [lt], attrs={"to": parse_type("ufixed<5,0,RND_CONV,SAT>")})
    b.output(q, *([lt] if extra_consumer else []))
    return b.build()


def test_fold_gives_the_same_codes_for_every_input_code():
    g = _graph()
    pm = PassManager([fold_lookup_quantize])
    g2 = pm.run(g)
    assert [n.op for n in g2.nodes] == ["Lookup"] and g2.outputs == g.outputs
    assert str(g2.nodes[0].params["table"].dtype) == "ufixed<5,0,RND_CONV,SAT>"
    x = np.arange(-16, 16, dtype=np.int64)[None, :]  # all 32 codes
    want = ref.execute(g, {"x": x}, codes=True)["q"]
    np.testing.assert_array_equal(ref.execute(g2, {"x": x}, codes=True)["q"], want)
    assert len(np.unique(want)) > 8  # the table is not trivial
    assert any("folded Quantize 'q'" in s for s in pm.context.notes)


def test_no_fold_when_the_float_table_is_also_an_output():
    g = _graph(extra_consumer=True)
    assert [n.op for n in PassManager([fold_lookup_quantize]).run(g).nodes] == ["Lookup", "Quantize"]
