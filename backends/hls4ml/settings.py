"""The hls4ml settings of one compile or estimate, validated once: part, clock period, io type,
strategy and reuse factors, with the reuse factor of every Dense/Conv layer legalized the way
hls4ml legalizes it, so that the project qdeploy writes and the estimate describe the same design.

hls4ml 1.3 (``FPGABackend.set_closest_reuse_factor``, ``backends/fpga/fpga_backend.py``; called by
``VivadoBackend.init_dense`` / ``init_conv1d`` / ``init_conv2d`` ... for the Resource strategy) replaces a
reuse factor its Resource kernels cannot implement by the closest legal one (ties: the smaller),
printing a warning that nobody reads.  qdeploy computes that value itself
(:func:`closest_reuse_factor`), writes it into each layer's ``ReuseFactor`` so hls4ml has nothing
to change, reports every adjustment, and uses the same values in the estimate.  With the Latency
strategy hls4ml takes the reuse factor as it is (``#pragma HLS ALLOCATION ... limit=ceil(n_in *
n_out / rf)``); a value above ``n_in * n_out`` buys nothing more and is lowered to it.

Config (``config["hls4ml"]``, also the ``estimate`` keys): ``reuse_factor`` is an int for every
layer, or a mapping ``{IR node name: int, "default": int}`` (hls4ml's ``LayerName`` style, keyed
by qdeploy IR node names: ``qdeploy inspect`` lists them).
"""
from __future__ import annotations

from bisect import bisect_left

from ...compiler.errors import QDeployError
from .resources import resolve_part, valid_reuse_factors

#: full Xilinx part numbers hls4ml/Vitis need, for the short names the estimator knows
FULL_PARTS = {"xcvu9p": "xcvu9p-flga2104-2L-e", "xcvu13p": "xcvu13p-flga2577-2-e",
              "xcku115": "xcku115-flvb2104-2-i", "xcu250": "xcu250-figd2104-2L-e",
              "xczu9eg": "xczu9eg-ffvb1156-2-e", "xc7z020": "xc7z020clg400-1"}


def full_part(part: str) -> str:
    """The part number to give hls4ml: a full part number is kept, a short or board name
    (``vu9p``, ``xcvu9p``, ``zcu102``, ``pynq-z2``) becomes the usual full part of that device.

    Raises:
        QDeployError: an unknown short name (the message lists the known parts).
    """
    p = str(part).strip()
    if "-" in p and p.lower().startswith("xc"):  # a full part number (xcvu9p-flga2104-2L-e, xc7a35tcpg236-1)
        return p  # hls4ml takes any; the estimate says when it does not know the device
    key, _ = resolve_part(p)
    return FULL_PARTS[key]


def requested_reuse_factor(reuse_factor, node_name: str) -> int:
    """The reuse factor the user asked for at IR node ``node_name`` (an int, or a mapping with
    per-node values and an optional ``"default"``, else 1).

    Raises:
        QDeployError: a value that is not an integer >= 1 (naming the node).
    """
    rf = reuse_factor
    if isinstance(rf, dict):
        rf = rf.get(node_name, rf.get("default", 1))
    if isinstance(rf, bool):
        raise QDeployError(f"reuse factor must be an integer >= 1, got {rf!r}", node_name)
    try:
        v = int(rf)
    except (TypeError, ValueError):
        raise QDeployError(f"reuse factor must be an integer >= 1, got {rf!r}", node_name) from None
    if v != rf or v < 1:
        raise QDeployError(f"reuse factor must be an integer >= 1, got {rf!r}", node_name)
    return v


def check_reuse_factor_keys(reuse_factor, node_names, graph=None) -> None:
    """A per-node ``reuse_factor`` mapping may only name existing nodes (and ``default``); module
    names have been mapped to node names before (:func:`qdeploy.compiler.ir.modules.node_keyed`).

    Raises:
        QDeployError: listing the unknown names and some known ones (node names, and the
            PyTorch module names of those nodes when the graph records them).
    """
    if isinstance(reuse_factor, dict):
        unknown = sorted(set(reuse_factor) - set(node_names) - {"default"})
        if unknown:
            mods = (graph.meta.get("modules") or {}) if graph is not None else {}
            known = sorted({mods[n] for n in node_names if n in mods})
            raise QDeployError(f"reuse_factor names unknown node(s) {unknown}; nodes with weights: "
                               f"{sorted(node_names)[:12]}" + (f"; their modules: {known[:12]}" if known else ""))


def closest_reuse_factor(n_in: int, n_out: int, rf: int, strategy: str) -> int:
    """The reuse factor hls4ml builds for an ``n_in x n_out`` Dense/Conv kernel asked for ``rf``:
    Resource: ``rf`` when legal (:func:`~.resources.valid_reuse_factors`), else the closest legal
    value, the smaller on a tie (``FPGABackend.get_closest_reuse_factor``); Latency:
    ``min(rf, n_in * n_out)``."""
    if strategy != "Resource":
        return min(rf, n_in * n_out)
    valid = valid_reuse_factors(n_in, n_out)
    if rf in valid:
        return rf
    pos = bisect_left(valid, rf)
    if pos == 0:
        return valid[0]
    if pos == len(valid):
        return valid[-1]
    before, after = valid[pos - 1], valid[pos]
    return after if after - rf < rf - before else before


def adjusted_sentence(rfs: dict) -> str | None:
    """One line naming every layer whose reuse factor was changed, or None."""
    adj = [f"{k} {v['requested']} -> {v['used']}" for k, v in rfs.items() if v["requested"] != v["used"]]
    if not adj:
        return None
    return (f"reuse factor adjusted to what hls4ml can build ({len(adj)} layer(s)): " + ", ".join(adj[:8])
            + (" ..." if len(adj) > 8 else ""))
