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


def test_folded_table_exports_as_the_function_and_a_quant(tmp_path):
    """The folded (fixed-point) Sigmoid table exports as Sigmoid -> Quant, which qonnx's executor
    runs to the same codes; a table that is not the function's is refused naming the node."""
    import pytest

    from qdeploy.compiler.errors import UnsupportedError
    from qdeploy.compiler.frontends import export_qonnx
    from qdeploy.compiler.ir.ops.lookup import source_values
    from tests.compiler.test_frontends import run_qonnx

    b = GraphBuilder("lk")
    ti, to = parse_type("fixed<5,2>"), parse_type("ufixed<5,0,RND_CONV,SAT>")
    x = b.input("x", (32,), ti)
    real = ti.to_real(np.arange(-16, 16)).astype(np.float32)
    b.output(b.add("lt", "Lookup", [x], attrs={"fn": "Sigmoid"}, params={"table": Const(source_values("Sigmoid", real),
                                                                                          FLOAT32)}))
    g = b.build()
    q = GraphBuilder("lkq")
    xq = q.input("x", (32,), ti)
    lt = q.add("lt", "Lookup", [xq], attrs={"fn": "Sigmoid"}, params=dict(g.nodes[0].params))
    q.output(q.add("q", "Quantize", [lt], attrs={"to": to}))
    folded = PassManager([fold_lookup_quantize]).run(q.build())
    codes = np.arange(-16, 16, dtype=np.int64)[None, :]
    want = ref.execute(folded, {"x": codes}, codes=True)["q"]
    m = export_qonnx(folded, tmp_path / "lk.onnx")
    got = run_qonnx(m, ti.to_real(codes).astype(np.float32))
    np.testing.assert_array_equal(got, to.to_real(want))
    bad = folded.with_(nodes=[folded.nodes[0].replace(params={"table": Const(want[0] ^ 1, to)})])
    with pytest.raises(UnsupportedError, match="node 'lt'.*not Sigmoid"):
        export_qonnx(bad)
