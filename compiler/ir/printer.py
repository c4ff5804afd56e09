"""Stable text form of a graph: one node a line (golden tests compare it)."""
from __future__ import annotations


def _fmt_attr(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt_attr(x) for x in v) + "]"
    return str(v)


def format_graph(graph) -> str:
    """Render ``graph``::

        graph mlp(%x: fixed<18,2>[16]) -> (%fc3)
          %fc1: fixed<27,5>[64] = Dense(%x) weight=fixed<6,1>[16,64] bias=fixed<6,1>[64]
          ...
    """
    ins = ", ".join(f"%{v.name}: {v.dtype}{list(v.shape)}" for v in graph.input_values())
    outs = ", ".join(f"%{o}" for o in graph.outputs)
    lines = [f"graph {graph.name}({ins}) -> ({outs})"]
    for n in graph.nodes:
        outs_s = ", ".join(f"%{o}: {graph.values[o].dtype}{list(graph.values[o].shape)}" for o in n.outputs)
        args = ", ".join(f"%{i}" for i in n.inputs)
        extra = [f"{k}={_fmt_attr(v)}" for k, v in sorted(n.attrs.items())]
        extra += [f"{r}={c.dtype}{list(c.shape)}" for r, c in sorted(n.params.items())]
        name = f"  # {n.name}" if n.name != n.outputs[0] else ""
        lines.append(f"  {outs_s} = {n.op}({args})" + (" " + " ".join(extra) if extra else "") + name)
    return "\n".join(lines)
