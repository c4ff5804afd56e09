"""The hls4ml translation table, the FPGA and ASIC estimate tables, and the hls4ml backend's
``supports`` answer (no hls4ml build: these only translate and estimate)."""
import numpy as np
import pytest

from qdeploy.backends import asic
from qdeploy.backends.asic import ops as asic_ops
import qdeploy.backends.hls4ml as hls4ml_backend
from qdeploy.backends.hls4ml import Hls4mlBackend
from qdeploy.backends.hls4ml.estimate import estimate
from qdeploy.backends.hls4ml.ops import ESTIMATE, TRANSLATE
from qdeploy.backends.hls4ml.resources import Cost
from qdeploy.backends.hls4ml.translate import translate
from qdeploy.compiler.errors import UnsupportedError
from qdeploy.compiler.ir import Const, GraphBuilder, parse_type
from qdeploy.compiler.ir.ops import OPS
from qdeploy.compiler.ir.optable import OpTable, Rejected
from qdeploy.compiler.ir.types import FloatType

T = parse_type
TABLES = {"hls4ml translate": TRANSLATE, "hls4ml estimate": ESTIMATE, "asic estimate": asic_ops.ESTIMATE}


def mlp(softmax=True):
    """Float input -> Quantize (host) -> Dense -> Relu -> Dense [-> Softmax (host)]."""
    rng = np.random.default_rng(3)
    b = GraphBuilder("m")
    h = b.input("x", (6,), FloatType())
    h = b.add("q", "Quantize", [h], attrs={"to": T("fixed<8,3>")})
    h = b.add("fc1", "Dense", [h], params={"weight": Const(rng.integers(-8, 8, (6, 4)), T("fixed<4,1>"))})
    h = b.add("relu", "Relu", [h])
    h = b.add("fc2", "Dense", [h], params={"weight": Const(rng.integers(-8, 8, (4, 3)), T("fixed<4,1>"))})
    if softmax:
        h = b.add("sm", "Softmax", [h])
    b.output(h)
    return b.build()


@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_ir_op_is_implemented_or_rejected_with_a_reason(name):
    table = TABLES[name]
    missing = set(OPS) - set(table)
    assert not missing, f"{name} table has no entry for {sorted(missing)}"
    for op in table:
        e = table.entry(op)
        assert callable(e) or isinstance(e, (Rejected, Cost)), (op, e)
        if isinstance(e, Rejected):
            assert len(e.reason) > 20, (op, e.reason)


def test_one_hls4ml_entry_declares_translation_and_estimate():
    assert list(TRANSLATE) == list(ESTIMATE)
    assert isinstance(TRANSLATE.entry("Softmax"), Rejected)  # float: runs on the host
    timings = {op: ESTIMATE.entry(op).timing for op in ESTIMATE if not isinstance(ESTIMATE.entry(op), Rejected)}
    assert timings["Dense"] == timings["Conv"] == "registered"
    assert timings["Softmax"] == "standalone"
    assert timings["Relu"] == timings["Reshape"] == timings["MaxPool"] == "chained"
    with pytest.raises(ValueError, match="timing must be one of"):
        Cost(lambda ctx, node: {}, "pipelined")


def test_supports_answers_from_the_translate_table(monkeypatch):
    be = Hls4mlBackend()
    g = mlp()
    assert be.supports(g)  # the float Quantize and Softmax run on the host
    assert not TRANSLATE.supports(g)  # ... but the whole graph holds the rejected Softmax
    without_relu = OpTable("hls4ml")
    for op in TRANSLATE:
        if op != "Relu":
            without_relu.set(op, TRANSLATE.entry(op))
    monkeypatch.setattr(hls4ml_backend, "TRANSLATE", without_relu)
    assert not be.supports(g)
    monkeypatch.undo()
    assert be.supports(g)
    b = GraphBuilder("float_core")
    w = Const(np.ones((6, 6), dtype=np.int64), T("fixed<4,1>"))
    h = b.add("fc1", "Dense", [b.input("x", (6,), T("fixed<8,3>"))], params={"weight": w})
    h = b.add("sm", "Softmax", [h])
    h = b.add("q2", "Quantize", [h], attrs={"to": T("fixed<8,1>")})
    b.output(b.add("fc2", "Dense", [h], params={"weight": w}))
    assert not be.supports(b.build())  # a float op feeding the fixed-point core cannot be partitioned


def test_unknown_op_is_named_by_the_table_and_the_driver():
    dev = _device()
    gelu = dev.with_(nodes=[n.replace(op="Gelu") if n.name == "relu" else n for n in dev.nodes])
    assert TRANSLATE.unsupported(gelu) == [("relu", "op 'Gelu' has no hls4ml implementation")]
    with pytest.raises(UnsupportedError, match="node 'relu'.*op Gelu has no exact hls4ml mapping"):
        translate(gelu)


def test_translate_driver_calls_the_table_entries():
    tr = translate(_device())
    classes = [d["class_name"] for d in tr.layers]
    assert classes == ["InputLayer", "Dense", "Activation", "Dense"]
    assert tr.node_layers == {"fc1": ["fc1"], "relu": ["relu"], "fc2": ["fc2"]}
    assert tr.precisions["fc1"]["weight"] == "ap_fixed<4,1>"


def _device():
    rng = np.random.default_rng(3)
    b = GraphBuilder("d")
    h = b.input("x", (6,), T("fixed<8,3>"))
    h = b.add("fc1", "Dense", [h], params={"weight": Const(rng.integers(-8, 8, (6, 4)), T("fixed<4,1>"))})
    h = b.add("relu", "Relu", [h])
    h = b.add("fc2", "Dense", [h], params={"weight": Const(rng.integers(-8, 8, (4, 3)), T("fixed<4,1>"))})
    b.output(h)
    return b.build()


def test_estimators_price_through_their_tables():
    g = mlp()
    fpga = {r["name"]: r for r in estimate(g)["layers"]}
    assert fpga["q"]["host"] and fpga["sm"]["host"] and not fpga["fc1"]["host"]
    assert fpga["fc1"]["lut"] > 0 and fpga["relu"]["lut"] > 0
    on_dev = {r["name"]: r for r in estimate(g, {"softmax_on_device": True})["layers"]}
    assert not on_dev["sm"]["host"] and on_dev["sm"]["bram_18k"] > 0  # the standalone Softmax row
    a = {r["name"]: r for r in asic.estimate(g)["layers"]}
    assert a["sm"]["host"] and a["fc1"]["ge"] > a["relu"]["ge"] > 0


def test_asic_kind_defaults_cover_ops_without_an_entry_of_their_own():
    table = OpTable("asic estimate (test)")
    own = lambda graph, node, opts: (1.0, 0, 0.0, 1)  # noqa: E731
    table.set("Add", own)
    asic_ops.fill_by_kind(table, {"Add": "elementwise", "LeakyRelu": "elementwise", "Flatten": "layout",
                                  "Dense": "mac", "MinPool": "pool"})
    assert table.entry("Add") is own  # an entry of its own wins
    assert table.entry("LeakyRelu") is asic_ops.KIND_COSTS["elementwise"]
    assert table.entry("Flatten") is asic_ops.KIND_COSTS["layout"]
    assert table.entry("Dense") is asic_ops.KIND_COSTS["mac"]
    assert "MinPool" not in table  # no generic pool cost: such an op needs its own entry
    # the generic elementwise cost on a real node: one full adder per output bit, a ripple of its width
    g = _device()
    relu = next(n for n in g.nodes if n.name == "relu")
    ge, ff, e_fj, stages = table.entry("LeakyRelu")(g, relu, {})
    out = g.value(relu.output)
    assert (ge, ff, stages) == (pytest.approx(out.size * out.dtype.width * 5.33), 0, out.dtype.width)
