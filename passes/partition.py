"""Host/device partition: float prologue and epilogue run on the host, the fixed-point core on
the device (FPGA firmware)."""
from __future__ import annotations

from dataclasses import dataclass

from ..compiler.errors import UnsupportedError
from ..compiler.ir.graph import Graph, GraphBuilder
from ..compiler.ir.types import FloatType


@dataclass
class Partition:
    """Three graphs whose composition is the original.

    Attributes:
        prologue: float ops on the inputs up to and including each input ``Quantize`` (and a
            ``MultiThreshold`` right after it) (host, NumPy), or None.  Outputs: the device inputs.
        device: the fixed-point core.  All of its inputs and outputs have fixed types.
        epilogue: float ops after the last fixed-point values (e.g. a float output scale,
            Softmax), run on the host, or None.
    """

    prologue: Graph | None
    device: Graph
    epilogue: Graph | None


def subgraph(graph: Graph, nodes, inputs, outputs, suffix: str) -> Graph | None:
    """The graph of ``nodes`` (a topologically ordered subset of ``graph.nodes``) with the given
    ``inputs`` and ``outputs`` (value names of ``graph``; types and shapes copied), named
    ``<graph name>_<suffix>`` and keeping ``graph.meta``; None when ``nodes`` is empty.

    Raises:
        VerifyError: (from :class:`GraphBuilder`) a node reads a value that is neither an input
            nor produced by an earlier node.
    """
    if not nodes:
        return None
    b = GraphBuilder(f"{graph.name}_{suffix}", dict(graph.meta))
    for i in inputs:
        v = graph.value(i)
        b.input(i, v.shape, v.dtype)
    for n in nodes:
        b.add_node(n)
    b.output(*outputs)
    return b.build()


def partition(graph: Graph) -> Partition:
    """Split ``graph`` into host prologue / fixed-point device core / host epilogue.

    A node belongs to the prologue when it only reads graph inputs or prologue values and is a
    float op or a ``Quantize`` of a float value, or when it is a ``MultiThreshold`` reading only
    values the prologue computed (an input quantizer imported as a float32-exact grid ``Quantize``
    followed by its thresholds, :func:`qdeploy.compiler.ir.requant.float_input_thresholds`: the
    whole quantizer runs on the host, exactly); nodes with a float output that are not in the
    prologue form the epilogue; the rest is the device core.

    Raises:
        UnsupportedError: when a float op sits inside the fixed-point core (its output feeds a
            device node), naming that node; or when the graph has no fixed-point core.
    """
    pro, dev, epi = [], [], []
    pro_vals = set(graph.inputs)
    for n in graph.nodes:
        out_t = graph.value(n.output).dtype
        in_float = all(isinstance(graph.value(i).dtype, FloatType) for i in n.inputs)
        if all(i in pro_vals for i in n.inputs) and (isinstance(out_t, FloatType) or (n.op in ("Quantize", "Sign") and in_float)):
            pro.append(n)
            pro_vals.add(n.output)
        elif n.op == "MultiThreshold" and all(i in pro_vals and i not in graph.inputs for i in n.inputs):
            # the second half of an input quantizer: float -> exact fixed grid (Quantize) -> thresholds
            pro.append(n)
            pro_vals.add(n.output)
        elif isinstance(out_t, FloatType):
            epi.append(n)
        else:
            dev.append(n)
    epi_vals = {n.output for n in epi}
    for n in dev:
        for i in n.inputs:
            if i in epi_vals:
                raise UnsupportedError(f"float op feeds the fixed-point datapath at '{n.name}': only float ops before "
                                       f"the input quantizers or after the last fixed-point layer can run on the host",
                                       graph.producer(i).name)
            if isinstance(graph.value(i).dtype, FloatType):
                raise UnsupportedError(f"{n.op} reads float value {i!r}; quantize it first", n.name)
    if not dev:
        first = next((n for n in graph.nodes if n.params), graph.nodes[0] if graph.nodes else None)
        raise UnsupportedError(f"model '{graph.name}' has no fixed-point layers for the device: this layer and all "
                               f"others compute in float32 (quantize the model with QONNX Quant / Brevitas "
                               f"power-of-two quantizers, or use target tvm-llvm)", first.name if first else graph.name)
    dev_outs = {n.output for n in dev}
    dev_inputs = []
    for n in dev:
        for i in n.inputs:
            if i in pro_vals and i not in dev_inputs:
                dev_inputs.append(i)
    dev_outputs = [o for o in graph.outputs if o in dev_outs]
    for n in epi:
        dev_outputs += [i for i in n.inputs if i in dev_outs and i not in dev_outputs]
    pro_outputs = [v for v in dev_inputs if v not in graph.inputs]
    pro_outputs += [o for o in graph.outputs if o in {n.output for n in pro} and o not in pro_outputs]
    prologue = subgraph(graph, pro, list(graph.inputs), pro_outputs, "prologue") if pro else None
    device = subgraph(graph, dev, dev_inputs, dev_outputs, "device")
    epilogue = subgraph(graph, epi, external_inputs(epi), [o for o in graph.outputs if o in epi_vals],
                        "epilogue") if epi else None
    return Partition(prologue, device, epilogue)


def run_partitioned(part: Partition, graph: Graph, feeds: dict, device_fn) -> dict:
    """Run prologue (reference), ``device_fn`` (runtime arrays in/out), epilogue (reference).

    ``feeds`` are runtime arrays of ``graph``'s inputs; returns runtime arrays of its outputs.
    """
    from ..compiler.reference import execute

    env = dict(feeds)
    if part.prologue is not None:
        env.update(execute(part.prologue, {i: env[i] for i in part.prologue.inputs}, codes=True))
    env.update(device_fn({i: env[i] for i in part.device.inputs}))
    if part.epilogue is not None:
        env.update(execute(part.epilogue, {i: env[i] for i in part.epilogue.inputs}, codes=True))
    return {o: env[o] for o in graph.outputs}



def external_inputs(nodes) -> list[str]:
    """The values ``nodes`` read that none of them computes, in first-use order (the inputs of
    the subgraph they form)."""
    made = {n.output for n in nodes}
    out: list[str] = []
    for n in nodes:
        out += [i for i in n.inputs if i not in made and i not in out]
    return out


def split_epilogue(graph: Graph, device_ok=None) -> tuple[Graph, Graph | None]:
    """Split a quantized graph into (core, float epilogue).

    The core is everything but the trailing float ops (prologue + fixed-point core); its
    outputs are the graph outputs it computes plus the epilogue's inputs.  Float graphs, and
    graphs whose float ops do not all sit at the ends, come back whole with epilogue None.

    Args:
        device_ok: optional ``f(node, input types) -> bool``: an epilogue node reading only
            core values (fixed-point) for which it is true stays in the core (a backend that
            computes it exactly, e.g. the TVM library's table softmax).
    """
    if not graph.is_quantized():
        return graph, None
    try:
        part = partition(graph)
    except UnsupportedError:
        return graph, None
    if part.epilogue is None:
        return graph, None
    epi_names = {n.name for n in part.epilogue.nodes}
    if device_ok is not None:
        for n in part.epilogue.nodes:  # topological order: a kept node's output is a core value
            if all(graph.producer(i) is None or graph.producer(i).name not in epi_names for i in n.inputs) and \
                    device_ok(n, [graph.value(i).dtype for i in n.inputs]):
                epi_names.discard(n.name)
        if not epi_names:
            return graph, None
        part_epi = [n for n in graph.nodes if n.name in epi_names]
        epi_vals = {n.output for n in part_epi}
        epilogue = subgraph(graph, part_epi, external_inputs(part_epi), [o for o in graph.outputs if o in epi_vals],
                            "epilogue")
        part = Partition(part.prologue, part.device, epilogue)
    core_nodes = [n for n in graph.nodes if n.name not in epi_names]
    core_out = [o for o in graph.outputs if o not in {n.output for n in part.epilogue.nodes}]
    core_out += [i for i in part.epilogue.inputs if i not in core_out]
    core = subgraph(graph, core_nodes, list(graph.inputs), core_out, "core")
    return core, part.epilogue
