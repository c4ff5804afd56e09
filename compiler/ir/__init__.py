"""qdeploy IR: exact fixed-point types, immutable graphs, type rules, verifier, printer."""
from .graph import Const, Graph, GraphBuilder, Node, Value, rebuild
from .ops import OPS, infer
from .printer import format_graph
from .types import (FLOAT32, DType, FixedType, FloatType, exact_type_for_values, fixed_for_range, int_type,
                    parse_type, requantize)
from .verify import verify

__all__ = ["Const", "Graph", "GraphBuilder", "Node", "Value", "rebuild", "OPS", "infer", "format_graph", "FLOAT32",
           "DType", "FixedType", "FloatType", "exact_type_for_values", "fixed_for_range", "int_type", "parse_type",
           "requantize", "verify"]
