"""The op registry and the per-backend op tables.

Every registered op must have an entry -- an implementation or a :class:`Rejected` with a
reason -- in every backend and estimator table listed in :data:`OP_TABLES`, so an op added to
``compiler/ir/ops/`` without deciding what each backend does with it fails here.
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest

from qdeploy.compiler import reference as ref
from qdeploy.compiler.errors import UnsupportedError, VerifyError
from qdeploy.compiler.ir import Const, GraphBuilder, Node, Value, parse_type
from qdeploy.compiler.ir.ops import OPS, REGISTRY, OpSpec, all_ops, get, infer, register
from qdeploy.compiler.ir.optable import OpTable, Rejected
from qdeploy.passes.memory import node_macs

#: Every backend/estimator op table, as ``"module:attribute"``.
OP_TABLES = [
    "qdeploy.backends.tvm.ops:LOWERING",
    "qdeploy.backends.hls4ml.ops:TRANSLATE",
    "qdeploy.backends.hls4ml.ops:ESTIMATE",
    "qdeploy.backends.asic.ops:ESTIMATE",
    "qdeploy.compiler.frontends.export:EXPORTERS",
]


def load_table(spec: str) -> OpTable:
    mod, attr = spec.split(":")
    return getattr(importlib.import_module(mod), attr)


def coverage_problems(table: OpTable, ops=None) -> list[str]:
    """What is wrong with ``table`` against the registry: ops with no entry, rejections without
    a reason, entries that are neither callable-ish nor rejected."""
    problems = []
    for op in (ops if ops is not None else all_ops()):
        e = table.entry(op)
        if e is None:
            problems.append(f"{table.backend}: no entry for op {op!r} (implement it or reject it with a reason)")
        elif isinstance(e, Rejected):
            if not isinstance(e.reason, str) or not e.reason.strip():
                problems.append(f"{table.backend}: op {op!r} rejected without a reason")
    for op in table:
        if op not in REGISTRY:
            problems.append(f"{table.backend}: entry for unregistered op {op!r}")
    return problems


@pytest.mark.parametrize("spec", OP_TABLES)
def test_every_registered_op_is_in_every_table(spec):
    table = load_table(spec)
    assert isinstance(table, OpTable)
    assert coverage_problems(table) == []


def test_a_table_missing_an_op_fails_the_check():
    full = load_table(OP_TABLES[0])
    partial = OpTable("throwaway")
    for op in full:
        if op != "Softmax":
            partial.set(op, full.entry(op))
    problems = coverage_problems(partial)
    assert problems == ["throwaway: no entry for op 'Softmax' (implement it or reject it with a reason)"]
    partial.reject("Softmax", "")
    assert coverage_problems(partial) == ["throwaway: op 'Softmax' rejected without a reason"]
    rejecting = OpTable("throwaway2")
    for op in all_ops():
        rejecting.reject(op, "not on this target")
    assert coverage_problems(rejecting) == []
    rejecting.set("NoSuchOp", object())
    assert coverage_problems(rejecting) == ["throwaway2: entry for unregistered op 'NoSuchOp'"]


def test_registry_lists_the_builtin_ops():
    # the ops every frontend relies on (a new op adds to these; none may disappear)
    assert set(OPS) >= {"Quantize", "Sign", "Dense", "Conv", "Relu", "Add", "Mul", "Affine", "Concat", "Reshape",
                        "Transpose", "MaxPool", "AvgPool", "GlobalAvgPool", "Softmax"}
    assert OPS == all_ops()
    for name, spec in REGISTRY.items():
        assert spec.name == name and spec.summary.strip()
        assert callable(spec.infer) and callable(spec.reference) and callable(spec.macs)
    assert get("NoSuchOp") is None
    assert {op for op in OPS if get(op).quantizes} == {"Quantize", "Sign"}


def test_registering_an_op_twice_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        register(OpSpec(name="Relu", summary="dup", infer=lambda n, i: None, reference=lambda *a: None))
    assert REGISTRY["Relu"].summary == "max(x, 0)"


def test_infer_checks_arity_and_unknown_ops():
    x = Value("x", (4,), parse_type("fixed<8,3>"))
    with pytest.raises(VerifyError, match="Add takes 2 input"):
        infer(Node("a", "Add", ("x",), ("y",)), [x])
    with pytest.raises(VerifyError, match="Concat needs at least two inputs"):
        infer(Node("c", "Concat", ("x",), ("y",)), [x])
    with pytest.raises(UnsupportedError, match="unknown op type 'Frobnicate'"):
        infer(Node("f", "Frobnicate", ("x",), ("y",)), [x])


def test_reference_has_no_kernel_for_an_unknown_op():
    with pytest.raises(UnsupportedError, match="reference interpreter has no kernel for op 'Frobnicate'") as ei:
        ref.run_node(Node("f", "Frobnicate", ("x",), ("y",)), [np.zeros((1, 4))], [parse_type("fixed<8,3>")],
                     parse_type("fixed<8,3>"))
    assert ei.value.node == "f"


def _small_graph(rng):
    b = GraphBuilder("g")
    x = b.input("x", (6, 6, 3), parse_type("fixed<8,3>"))
    c = b.add("conv", "Conv", [x], attrs={"kernel": (3, 3)},
              params={"weight": Const(rng.integers(-4, 4, (3, 3, 3, 5)), parse_type("fixed<4,1>"))})
    p = b.add("pool", "MaxPool", [c], attrs={"kernel": (2, 2), "strides": (2, 2)})
    gp = b.add("gap", "GlobalAvgPool", [p])
    d = b.add("fc", "Dense", [gp], params={"weight": Const(rng.integers(-4, 4, (5, 2)), parse_type("fixed<4,1>"))})
    r = b.add("flat", "Reshape", [d], attrs={"shape": (2, 1)})
    b.output(b.add("relu", "Relu", [r]))
    return b.build()


def test_macs_come_from_the_op_specs(rng):
    g = _small_graph(rng)
    macs = {n.name: node_macs(n, g) for n in g.nodes}
    assert macs == {"conv": 4 * 4 * 5 * (3 * 3 * 3), "pool": 2 * 2 * 5 * 4, "gap": 2 * 2 * 5, "fc": 2 * 5,
                    "flat": 1, "relu": 2}


def test_tvm_backend_supports_answers_from_its_table(rng):
    pytest.importorskip("tvm")
    from qdeploy.backends.tvm import TvmBackend
    from qdeploy.backends.tvm.ops import LOWERING

    g = _small_graph(rng)
    assert TvmBackend().supports(g) is True
    assert LOWERING.unsupported(g) == []
    partial = OpTable("tvm-without-pools")
    for op in LOWERING:
        if op == "MaxPool":
            partial.reject(op, "no pools here")
        else:
            partial.set(op, LOWERING.entry(op))
    assert partial.supports(g) is False
    assert partial.unsupported(g) == [("pool", "no pools here")]


def test_an_op_declares_its_onnx_mapping_on_its_spec(monkeypatch):
    """A new op brings its ONNX import/export with its OpSpec: no frontend file changes."""
    from onnx import TensorProto, helper

    from qdeploy.compiler.frontends import export_qonnx, import_onnx
    from qdeploy.compiler.frontends.onnx_ops import importer_for
    from qdeploy.compiler.ir import FLOAT32

    def import_neg(cv, node):
        src = cv.entry(node, node.input[0])
        cv.bind(node.output[0], cv.add(node.name, "Negate", [src.value], out=node.output[0]), src.perm)

    spec = OpSpec(name="Negate", summary="-x (test op)", infer=lambda n, ins: (ins[0].shape, FLOAT32),
                  reference=lambda n, args, in_types, out_t: -args[0],
                  onnx_import={"Neg": import_neg},
                  onnx_export=lambda ex, n, x: ex.node("Neg", x, n.output + "__ir"))
    assert importer_for("Neg") is None
    monkeypatch.setitem(REGISTRY, "Negate", spec)
    assert importer_for("Neg") is import_neg
    node = helper.make_node("Neg", ["in"], ["out"], name="neg")
    model = helper.make_model(
        helper.make_graph([node], "m", [helper.make_tensor_value_info("in", TensorProto.FLOAT, [1, 3])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3])]),
        opset_imports=[helper.make_opsetid("", 13)])
    g = import_onnx(model)
    assert [n.op for n in g.nodes] == ["Negate"]
    x = np.array([[1.5, -2.0, 0.25]], dtype=np.float32)
    assert np.array_equal(ref.run(g, x), -x)
    assert [n.op_type for n in export_qonnx(g).graph.node] == ["Neg", "Identity"]


def test_every_op_declares_a_known_cost_kind():
    """Estimators price ops without an entry of their own by ``OpSpec.kind``."""
    from qdeploy.compiler.ir.ops import REGISTRY
    bad = {n: s.kind for n, s in REGISTRY.items() if s.kind not in ("mac", "elementwise", "layout", "pool")}
    assert not bad, bad
    assert REGISTRY["Dense"].kind == "mac" and REGISTRY["Reshape"].kind == "layout"
