"""Dynamic subgraph extraction and compilation (DyCL, Chen et al., ISSTA 2023, arXiv 2307.04963).

``capture`` (:mod:`qdeploy.compiler.frontends.ast_capture`) splits ``forward`` at its data-dependent
conditions into a control graph of straight-line blocks.  This module

1. **extracts** each block into an IR graph whose inputs/outputs are the live tensors at its
   boundaries (input-independent values are already folded into constants by the converter;
   here dead nodes and unused inputs are dropped with :func:`~qdeploy.passes.fold.dce`);
2. removes **pass-through / host-only blocks** from the device side (a block with no device op
   -- e.g. one that only forwards tensors or only computes a condition -- gets no artifact);
3. **compiles** every remaining block with the chosen backend (``emit``/``build``/``load``) into
   a stage artifact ``<out_dir>/block<k>`` (``manifest.json`` + ``ir/model``), writes
   ``<out_dir>/plan.json`` (the multi-stage plan layout shared with early exits, ``kind:
   "dynamic"``) and the host program ``host.pt``, and returns a
   :class:`~qdeploy.runtime.dynamic.DynamicModel` whose host walks the control plan (reload it
   from the directory alone with :meth:`~qdeploy.runtime.dynamic.DynamicModel.load`);
4. **reports** blocks, conditions, per-block compile times, specializations and host ops.

Usage::

    dm = compile_dynamic(model.eval(), torch.randn(1, 3, 32, 32), target="tvm-llvm")
    y = dm.run(x_batch)          # == model(x_i) for every sample, routed per sample
    print(render_report(dm.report))
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from .compiler.errors import QDeployError
from .compiler.frontends.ast_capture import capture
from .compiler.frontends.fx_to_ir import BlockIR, block_to_ir
from .compiler.frontends.program import BlockItem, CaptureError, ControlProgram, IfItem, count_items
from .passes.fold import dce
from .runtime.artifact import publish, staging_dir, write_manifest
from .runtime.layout import manifest_layouts
from .runtime.dynamic.plan import BlockStep, ControlPlan, IfStep, ReturnStep

__all__ = ["extract", "compile_dynamic", "render_report", "control_plan", "CaptureError"]


def _prune(bir: BlockIR) -> BlockIR:
    if bir.graph is None:
        return bir
    g = dce(bir.graph)
    if not g.nodes:
        return replace(bir, graph=None, dev_inputs=[], dev_outputs={})
    used = {i for nd in g.nodes for i in nd.inputs}
    g = g.with_(inputs=[i for i in g.inputs if i in used])
    return replace(bir, graph=g, dev_inputs=[d for d in bir.dev_inputs if d[1] in g.inputs])


def extract(program: ControlProgram, name: str = "dyn") -> dict:
    """``{block id: BlockIR}`` for every block of the program (device graph pruned, or None for
    a host-only / pass-through block)."""
    return {blk.id: _prune(block_to_ir(blk, f"{name}_b{blk.id}")) for blk in program.blocks()}


def control_plan(program: ControlProgram) -> ControlPlan:
    """The runtime's control plan of a captured program: the same blocks, conditions and returns
    (ids, variables, source lines), without the traced code."""
    def steps(items):
        out = []
        for it in items:
            if isinstance(it, BlockItem):
                out.append(BlockStep(it.id, list(it.inputs), list(it.outputs), tuple(it.lines)))
            elif isinstance(it, IfItem):
                out.append(IfStep(it.id, it.cond_var, it.test_src, it.line, steps(it.then), steps(it.orelse)))
            else:
                out.append(ReturnStep(it.id, tuple(it.names), bool(it.is_tuple)))
        return out
    return ControlPlan(steps(program.items), list(program.arg_names), getattr(program, "capture", "ast"))


def compile_dynamic(module, example_inputs, target: str = "tvm-llvm", out_dir=None, config: dict | None = None,
                    name: str | None = None, capture_method: str = "auto"):
    """Capture, extract and compile ``module``; returns a :class:`~qdeploy.runtime.dynamic.DynamicModel`.

    Args:
        module: ``nn.Module`` in eval mode (see the supported subset in
            :mod:`qdeploy.compiler.frontends.ast_capture`).
        example_inputs: batch-1 example tensor(s) (shapes only).
        target: backend name (``reference``, ``tvm-llvm``, ``hls4ml``).
        out_dir: where block artifacts go (``<out_dir>/block<k>``); a temporary directory if None.
        config: backend config passed to ``emit``.  For ``tvm-llvm`` the float blocks are
            built with ``tvm.schedule: "auto"`` (fused, vectorized loop schedule; see
            :mod:`qdeploy.backends.tvm.schedule`) and ``tvm.batch1_entry: true`` (a static
            batch-1 entry for single-sample calls) unless the config sets them.
        capture_method: ``"auto"`` (``torch.export`` for ``torch.cond`` models without plain
            data-dependent ``if``, else ``ast``), ``"export"`` or ``"ast"``; see
            :func:`~qdeploy.compiler.frontends.ast_capture.capture`.  The report's ``capture``
            says which path was used (``"torch.export"`` or ``"ast"``).
    Raises:
        CaptureError: unsupported dynamism, naming the source line.
    """
    from .backends import get_backend

    name = name or type(module).__name__
    t0 = time.perf_counter()
    prog = capture(module, example_inputs, method=capture_method)
    t_capture = time.perf_counter() - t0
    t0 = time.perf_counter()
    birs = extract(prog, name)
    t_extract = time.perf_counter() - t0
    backend = get_backend(target)
    if out_dir is not None:
        out = Path(out_dir).resolve()
        if out.exists() and any(out.iterdir()) and not (out / "plan.json").is_file():
            raise QDeployError(f"output directory {out} exists and is not a qdeploy dynamic program (no plan.json); "
                               "choose a new directory")
        stage = staging_dir(out)
    else:
        stage = out = Path(tempfile.mkdtemp(prefix=f"qdeploy_dyn_{name}_"))
    try:
        dm = _build_program(prog, birs, backend, target, name, config, out, stage, t_capture, t_extract)
        if stage != out:  # publish only a complete program: a failed compile leaves no directory
            publish(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return dm


def _build_program(prog, birs, backend, target, name, config, out, stage, t_capture, t_extract):
    """Compile every device block of ``prog`` into ``stage/block<k>`` and write ``stage/plan.json``;
    the returned model reports ``out`` (where the caller publishes ``stage``)."""
    from .runtime.dynamic import DynamicModel

    blocks, per_block = {}, []
    config = dict(config or {})
    if target == "tvm-llvm":
        # one library per block: the program's end-to-end check runs the libraries it loads, so
        # CPU variants (tvm-llvm's default "auto") would go unchecked; a user may still ask for them
        config["tvm"] = {"schedule": "auto", "batch1_entry": True, "cpu_variants": "none",
                         **dict(config.get("tvm") or {})}

    def build_one(blk):
        bir = birs[blk.id]
        if bir.graph is None:
            return None, 0.0
        d = stage / f"block{blk.id}"
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        info = backend.emit(bir.graph, dict(config), d)
        backend.build(d, info)
        fn = backend.load(d, info, bir.graph)
        secs = time.perf_counter() - t0
        # a stage artifact (loadable by runtime.compiled.CompiledModel / multistage.load_stages)
        (d / "ir").mkdir(exist_ok=True)
        bir.graph.save(str(d / "ir" / "model"))
        write_manifest(d, {
            "format": 1, "target": target, "backend": info, "kind": "dynamic_block", "block": blk.id,
            "graph_digest": bir.graph.digest(), "inputs": list(bir.graph.inputs),
            "outputs": list(bir.graph.outputs), "layouts": manifest_layouts(bir.graph)})
        return fn, secs

    blks = prog.blocks()
    t_build = time.perf_counter()
    built = [build_one(b) for b in blks]  # serial: TVM's Relax BlockBuilder is not thread-safe
    t_wall = time.perf_counter() - t_build
    for blk, (fn, secs) in zip(blks, built):
        bir = birs[blk.id]
        blocks[blk.id] = (bir, fn)
        per_block.append({
            "id": blk.id, "lines": list(blk.lines), "inputs": list(blk.inputs), "outputs": list(blk.outputs),
            "device": bir.graph is not None,
            "device_nodes": len(bir.graph.nodes) if bir.graph is not None else 0,
            "host_ops": list(bir.host_ops), "folded_constants": bir.folded,
            "compile_seconds": round(secs, 3)})
    counts = count_items(prog.items)
    report = {
        "model": name, "target": target, "capture": prog.capture, "capture_note": prog.capture_note,
        "blocks": counts["blocks"], "device_blocks": sum(b["device"] for b in per_block),
        "removed_from_device": [b["id"] for b in per_block if not b["device"]],
        "conditions": counts["conditions"], "returns": counts["returns"],
        "unrolled_loops": prog.unrolled,
        "specializations": prog.specializations,
        "folded_constants": sum(b["folded_constants"] for b in per_block),
        "specialized": bool(prog.specializations),
        "capture_seconds": round(t_capture, 3), "extract_seconds": round(t_extract, 3),
        "compile_seconds": round(sum(b["compile_seconds"] for b in per_block), 3),
        "compile_wall_seconds": round(t_wall, 3),
        "per_block": per_block, "out_dir": str(out),
        # the program routes each sample through data-dependent branches; there is no golden set here
        "fidelity": {"checked": False, "reason": "compile_dynamic takes no golden inputs, so the module is not run "
                                                 "as the source here: compare dm.run(x) with module(x) on your data"},
    }
    dm = DynamicModel(control_plan(prog), blocks, report, out)
    dm.save_plan(stage)  # plan.json (kind "dynamic") + host.pt next to the block artifacts: DynamicModel.load
    return dm


def render_report(r: dict) -> str:
    """Text form of a :func:`compile_dynamic` report."""
    lines = [f"{r['model']} -> {r['target']}: {r['blocks']} blocks ({r['device_blocks']} on device, "
             f"{len(r['removed_from_device'])} host-only removed), {r['conditions']} conditions, "
             f"{r['returns']} returns; compile {r['compile_seconds']} s; capture {r.get('capture', 'ast')}"]
    if r.get("capture_note"):
        lines.append(f"  capture note: {r['capture_note']}")
    if r["unrolled_loops"]:
        lines.append("  unrolled loops: " + ", ".join(f"line {u['line']} x{u['trips']}" for u in r["unrolled_loops"]))
    if r["specializations"]:
        lines.append("  specialized: " + "; ".join(f"line {s['line']} `{s['what']}` = {s['value']}"
                                                 for s in r["specializations"]))
    else:
        lines.append("  specialized: none (no input-independent branch decided at capture)")
    lines.append(f"  folded input-independent values: {r['folded_constants']}")
    if r.get("fidelity") and not r["fidelity"].get("checked"):
        lines.append(f"  fidelity vs source: NOT checked: {r['fidelity']['reason']}")
    for b in r["per_block"]:
        where = f"device {b['device_nodes']} nodes, {b['compile_seconds']} s" if b["device"] else "host only"
        host = f"; host ops {', '.join(b['host_ops'])}" if b["host_ops"] else ""
        lines.append(f"  block {b['id']} (lines {b['lines'][0]}-{b['lines'][-1]}): {where}; in {b['inputs']} "
                     f"out {b['outputs']}{host}")
    return "\n".join(lines)
