"""IR verifier: shapes, types, topological order, dangling and duplicate values."""
from __future__ import annotations

from ..errors import VerifyError
from .ops import infer
from .types import FixedType


def verify(graph) -> None:
    """Check ``graph`` and raise :class:`VerifyError` naming the first node at fault.

    Checks: graph has inputs and outputs; every node input is defined before use (topological
    order, no dangling values, no cycles); no value is written twice; every node output's
    recorded shape and type equal what the op's type rule gives; fixed-point constants hold
    codes inside their type's range; graph outputs are defined.
    """
    if not graph.inputs:
        raise VerifyError("graph has no inputs", graph.name)
    if not graph.outputs:
        raise VerifyError("graph has no outputs", graph.name)
    defined = set()
    for i in graph.inputs:
        if i not in graph.values:
            raise VerifyError(f"graph input {i!r} has no value", i)
        if i in defined:
            raise VerifyError(f"graph input {i!r} listed twice", i)
        defined.add(i)
    names = set()
    for n in graph.nodes:
        if n.name in names:
            raise VerifyError("duplicate node name", n.name)
        names.add(n.name)
        for i in n.inputs:
            if i not in defined:
                raise VerifyError(f"reads value {i!r} that is not defined before it (dangling value or cycle)", n.name)
        for role, c in n.params.items():
            if isinstance(c.dtype, FixedType) and c.data.size and (
                    c.data.min() < c.dtype.min_code or c.data.max() > c.dtype.max_code):
                raise VerifyError(f"constant {role!r} has codes outside {c.dtype}", n.name)
        shape, dtype = infer(n, [graph.values[i] for i in n.inputs])
        if len(n.outputs) != 1:
            raise VerifyError(f"{n.op} must have exactly one output", n.name)
        for o in n.outputs:
            if o in defined:
                raise VerifyError(f"output value {o!r} is written twice", n.name)
            v = graph.values.get(o)
            if v is None:
                raise VerifyError(f"output value {o!r} missing from the value table", n.name)
            if tuple(v.shape) != tuple(shape) or v.dtype != dtype:
                raise VerifyError(f"output {o!r} recorded as {v.dtype}{list(v.shape)} but the {n.op} rule gives "
                                  f"{dtype}{list(shape)}", n.name)
            defined.add(o)
    for o in graph.outputs:
        if o not in defined:
            raise VerifyError(f"graph output {o!r} is never computed", o)
