"""QONNX export of MultiThreshold: the exported model, run by qonnx's own ``execute_onnx``
(its ``MultiThreshold`` custom op), equals the IR reference interpreter on every output."""
from __future__ import annotations

import numpy as np
import pytest

from qdeploy.compiler import reference as ref
from qdeploy.compiler.errors import UnsupportedError
from qdeploy.compiler.frontends import export_qonnx
from qdeploy.compiler.ir import Const, GraphBuilder, parse_type
from tests.conformance.cases_threshold import _multi_threshold, _requant_nodes


def _qonnx_outputs(model, feeds: dict) -> dict:
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    out = execute_onnx(ModelWrapper(model), feeds)
    return {o.name: out[o.name] for o in model.graph.output}


@pytest.mark.parametrize("build", [_multi_threshold, _requant_nodes], ids=["random_thresholds", "requant"])
def test_exported_multi_threshold_runs_in_qonnx_exactly(build, tmp_path):
    b = GraphBuilder("mt_export")
    b.output(*build(b, "", np.random.default_rng(4)))
    g = b.build()
    model = export_qonnx(g, tmp_path / "mt.onnx")
    assert "MultiThreshold" in {nd.op_type for nd in model.graph.node}
    rng = np.random.default_rng(9)
    xt = g.values["x"].dtype
    for _ in range(12):
        codes = rng.integers(xt.min_code, xt.max_code + 1, (1, *g.values["x"].shape))
        want = ref.execute(g, {"x": codes}, codes=True)
        got = _qonnx_outputs(model, {"x": xt.to_real(codes).astype(np.float32)})
        for o in g.outputs:
            assert np.array_equal(got[o], g.values[o].dtype.to_real(want[o]).astype(np.float32)), o


def test_thresholds_beyond_float32_are_refused_naming_the_node():
    b = GraphBuilder("wide")
    x = b.input("x", (2,), parse_type("int<30>"))
    t = np.array([[(1 << 25) + 1, (1 << 26) + 3]] * 2)
    b.output(b.add("mt", "MultiThreshold", [x], attrs={"to": parse_type("int<3>")},
                   params={"thresholds": Const(t, parse_type("int<30>")),
                           "base": Const(np.zeros(2), parse_type("int<2>")),
                           "sign": Const(np.ones(2), parse_type("int<2>"))}))
    with pytest.raises(UnsupportedError, match="node 'mt': MultiThreshold with codes of more than 24 bits"):
        export_qonnx(b.build())
