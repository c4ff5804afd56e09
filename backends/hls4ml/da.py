"""hls4ml's ``distributed_arithmetic`` strategy (da4ml): what qdeploy accepts, and its estimate rule.

hls4ml 1.3 (``backends/vivado/passes/distributed_arithmetic.py``; docs: "Distributed Arithmetic",
https://fastmachinelearning.org/hls4ml/advanced/da.html) replaces each constant matrix-vector
product (CMVM) of a Dense/Conv layer by a multiplier-free adder graph that da4ml solves
(C. Sun et al., "da4ml: Distributed Arithmetic for Real-time Neural Networks on FPGAs",
arXiv 2507.04535): ``FixedVariableArray.from_kif(k, i, f, HWConfig(1, -1, -1))`` over the
layer's input type, ``@ kernel (+ bias)``, ``comb_trace``; the solution is written as C++ with one
exact ``ap_fixed`` per adder (``da4ml.codegen.hls``), then cast to the layer's result type.

Exactness: the adder graph is exact (every intermediate type is derived from the operand
intervals), the weights are the IR's on-grid reals and the Dense result type is the IR's exact
accumulator type, so the cast is lossless and the layer equals our reference.  The compile still
checks this on the golden set like every other build.

What qdeploy accepts (checked by :func:`check_da`, one-line errors naming the node): the Vitis and
Vivado backends (hls4ml implements DA only there; Catapult is refused), ``io_parallel``, Dense
layers on a vector (the jet tagger, TFC), reuse factor 1 (hls4ml's DA kernel is fully unrolled and
raises on any other value).  Refused until verified bit-exact here: ``io_stream`` (hls4ml's
``dense_da_wrapper``) and Conv layers (``conv*d_cl`` DA entry points, including a Dense on a feature map,
which becomes a pointwise Conv).  Depthwise convolutions have no DA implementation in hls4ml 1.3.

Estimate rule (:func:`da_rows`): per Dense layer the same da4ml solve hls4ml runs; its ``cost`` is the
sum over adders of their bit widths (``da4ml.cmvm.core.state_opr.cost_add`` with ``adder_size=1``),
i.e. one LUT per adder bit on a Xilinx carry chain, taken as the layer's LUTs; 0 DSP (no
multiplier survives), no BRAM.  Latency: the solution's adder depth (``CombLogic.latency``, one
per adder level with ``carry_size=-1``) times :func:`.resources.t_add` of the layer's output width,
in cycles of the effective clock (at least 1: hls4ml's top function is pipelined).  FF: the
layer's output vector registered once per cycle of its latency (a lower bound: HLS may register
intermediate adder outputs too; not validated against a synthesis report).

Validation: the da4ml paper reports its cost figure tracking post-synthesis LUTs of the CMVM
kernels (arXiv 2507.04535, Section 6), and a probe on this machine found da4ml's cost within
0.2-3% of yosys ``synth_xilinx -nodsp`` LUT counts on a quantized MLP (33,371 vs 33,131 LUTs;
``shared/TOOLCHAIN.md``).  That is da4ml's own RTL; the HLS-generated design adds the HLS tool's
own overhead, which no published row here measures yet: treat the figure as the CMVM kernel's
LUTs, not a post-HLS report.  The hls4ml docs claim up to 30% fewer LUTs than the Latency strategy
and no DSPs.
"""
from __future__ import annotations

import math

import numpy as np

from ...compiler.errors import UnsupportedError
from ...compiler.ir.graph import Graph
from ...compiler.ir.types import FixedType

#: The strategy name hls4ml uses (its config ``Strategy``; ``da`` is hls4ml's alias).
DA = "distributed_arithmetic"
#: hls4ml backends with a DA implementation (``VivadoBackend`` and its Vitis subclass).
DA_BACKENDS = ("Vitis", "Vivado")


def is_da(strategy) -> bool:
    """True when ``strategy`` names the distributed-arithmetic strategy (``distributed_arithmetic``
    or hls4ml's alias ``da``, any case)."""
    return str(strategy or "").lower() in (DA, "da")


def check_da(device: Graph, backend: str, io_type: str, rfs: dict) -> None:
    """Refuse what qdeploy does not build with the DA strategy (see the module docstring).

    Args:
        device: the fixed-point device graph (:func:`qdeploy.passes.partition`).
        backend: hls4ml backend name; io_type: ``io_parallel`` / ``io_stream``.
        rfs: per Dense/Conv node ``{"requested", "used", ...}`` (:func:`.mac_cost.layer_reuse_factors`).
    Raises:
        UnsupportedError: one line naming the option or the node and what is wrong.
    """
    if backend not in DA_BACKENDS:
        raise UnsupportedError(f"hls4ml.backend {backend!r}: strategy {DA!r} exists only for the "
                               f"{' and '.join(DA_BACKENDS)} backends (hls4ml 1.3)")
    if io_type != "io_parallel":
        raise UnsupportedError(f"hls4ml.io_type {io_type!r}: strategy {DA!r} is built by qdeploy with io_parallel "
                               f"only (io_stream is not yet verified bit-exact)")
    for n in device.nodes:
        if n.op == "Conv" or (n.op == "Dense" and len(device.value(n.inputs[0]).shape) != 1):
            raise UnsupportedError(f"{n.op} layers on feature maps are not built with strategy {DA!r} by qdeploy yet "
                                   f"(hls4ml's DA convolution is not verified bit-exact here); use Latency", n.name)
        if n.name in rfs and rfs[n.name]["requested"] != 1:
            raise UnsupportedError(f"strategy {DA!r} needs reuse factor 1 (hls4ml's DA kernel is fully unrolled), "
                                   f"got {rfs[n.name]['requested']}", n.name)


def input_kif(t: FixedType) -> tuple[int, int, int]:
    """(signed, integer bits without the sign, fraction bits) of fixed type ``t``: da4ml's ``kif``
    of an ``ap_[u]fixed<W, I>`` (hls4ml's ``_get_input_kif``: ``k, I - k, W - I``)."""
    k = int(bool(t.signed))
    return k, int(t.width - t.frac_bits - k), int(t.frac_bits)


def solve(graph: Graph, node):
    """The da4ml solution (a ``da4ml.cmvm.types.CombLogic``) of Dense ``node``'s constant
    matrix-vector product plus bias, solved exactly as hls4ml 1.3's ``DistributedArithmeticCodegen``
    does (``hard_dc`` = ``$DA_HARD_DC`` or 2, ``search_all_decompose_dc``).

    Raises:
        UnsupportedError: a float input or weight, or da4ml missing (install ``qdeploy[da]``).
    """
    import os
    try:
        from da4ml.trace import FixedVariableArray, HWConfig, comb_trace
    except ImportError:
        raise UnsupportedError(f"strategy {DA!r} needs the da4ml package (pip install 'qdeploy[da]')", node.name) from None
    x = graph.value(node.inputs[0])
    w = node.params["weight"]
    if not isinstance(x.dtype, FixedType) or not isinstance(w.dtype, FixedType):
        raise UnsupportedError(f"strategy {DA!r} needs fixed-point inputs and weights", node.name)
    kernel = np.asarray(w.real(), dtype=np.float64).reshape(-1, w.shape[-1])
    n_in = kernel.shape[0]
    k, i, f = input_kif(x.dtype)
    options = {"hard_dc": int(os.environ.get("DA_HARD_DC", 2)), "search_all_decompose_dc": True}
    inp = FixedVariableArray.from_kif(np.full(n_in, k), np.full(n_in, i), np.full(n_in, f), HWConfig(1, -1, -1),
                                      solver_options=options)
    out = inp @ kernel
    b = node.params.get("bias")
    if b is not None:
        out = out + np.broadcast_to(np.asarray(b.real(), dtype=np.float64), (kernel.shape[1],))
    return comb_trace(inp, out)


def da_row(ctx, node) -> dict:
    """Estimate row fields of Dense ``node`` built with the DA strategy (the rule in the module
    docstring): ``lut`` (da4ml cost), ``ff``, ``dsp`` 0, ``bram_18k`` 0, ``latency_cycles``,
    ``ii_cycles`` 1 and a ``detail`` with ``da_cost``, ``adder_depth``, ``n_in``, ``n_out``."""
    from .resources import t_add
    sol = solve(ctx.graph, node)
    out = ctx.graph.value(node.output)
    n_in, n_out = sol.shape
    depth = float(sol.latency[1])
    delay = depth * t_add(out.dtype.width)
    cycles = max(1, math.ceil(delay / ctx.period_eff))
    return {"lut": int(round(sol.cost)), "ff": int(n_out * out.dtype.width * cycles), "dsp": 0, "bram_18k": 0,
            "latency_cycles": cycles, "ii_cycles": 1,
            "detail": {"strategy": DA, "da_cost": float(sol.cost), "adder_depth": depth, "n_in": int(n_in),
                       "n_out": int(n_out), "reuse_factor_requested": 1, "reuse_factor": 1}}


def da_estimate(graph: Graph, config: dict, base) -> dict:
    """The hls4ml estimate of ``graph`` with ``strategy: distributed_arithmetic``: ``base`` (the
    Latency-strategy estimator, :func:`.estimate.estimate`) prices every other layer, each Dense
    row is replaced by :func:`da_row`, and the totals are recomputed.

    Raises:
        UnsupportedError: what :func:`check_da` refuses (io_stream, Conv, reuse factor != 1).
        QDeployError: everything ``base`` raises.
    """
    from .mac_cost import layer_reuse_factors
    from .resources import CLOCK_UNCERTAINTY, EstimateContext
    cfg = {**dict(config or {}), "strategy": "Latency"}
    est = base(graph, cfg)
    dev_nodes = {r["name"] for r in est["layers"] if not r["host"]}
    rfs = layer_reuse_factors(graph, "Latency", cfg.get("reuse_factor") or 1)
    dev = _device_view(graph, dev_nodes)
    check_da(dev, "Vitis", str(cfg.get("io_type") or "io_parallel"), {k: v for k, v in rfs.items() if k in dev_nodes})
    period = float(est["config"]["clock_period"])
    ctx = EstimateContext(graph, est["config"], est["part"], period * (1 - CLOCK_UNCERTAINTY))
    for r in est["layers"]:
        if r["host"] or r["op"] != "Dense":
            continue
        row = da_row(ctx, graph.node(r["name"]))
        r.update(row)
        r["latency_ns"] = round(r["latency_cycles"] * period, 3)
    # chained layers' latency is kept as the base rule priced it (A10): only Dense rows change
    total = est["total"]
    for k in ("lut", "ff", "dsp", "bram_18k", "latency_cycles"):
        total[k] = int(sum(r[k] for r in est["layers"]))
    total["latency_ns"] = round(total["latency_cycles"] * period, 3)
    part = est["part"]
    total["utilization_pct"] = {k: round(100.0 * total[k] / part[k], 2) for k in ("lut", "ff", "dsp", "bram_18k")}
    est["config"] = {**est["config"], "strategy": DA}
    est["reuse_factors"] = {k: v for k, v in est.get("reuse_factors", {}).items()}
    over = [f"{k.upper()} {v:.1f}%" for k, v in total["utilization_pct"].items() if v > 100.0]
    est["warnings"] = [w for w in est.get("warnings") or [] if "exceeds the part" not in w]
    if over:
        est["warnings"].append(f"the design exceeds the part {part['name']}: {', '.join(over)} of its capacity")
    est["note"] = ("Dense layers: da4ml's own cost of the solved adder graph (LUTs, 0 DSP; see "
                   "qdeploy.backends.hls4ml.da); other layers: " + est["note"])
    return est


def _device_view(graph: Graph, names: set):
    """A minimal stand-in for the device graph :func:`check_da` reads: ``nodes`` (those in ``names``)
    and ``value``."""
    class _View:
        nodes = [n for n in graph.nodes if n.name in names]
        value = staticmethod(graph.value)
    return _View()
