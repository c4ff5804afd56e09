"""The ``qdeploy`` command line (typer).

Exit codes: 0 success, 1 a check failed (e.g. golden mismatch), 2 bad input or a compile
error (one line on stderr naming the node and the reason).
"""
from __future__ import annotations

import contextlib

import sys
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from .cli_common import fail as _fail
from .compiler.errors import QDeployError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="qdeploy: compile quantized neural networks to hls4ml firmware and TVM libraries, bit-exact.")


def _version(value: bool):
    if value:
        from .version import __version__
        typer.echo(f"qdeploy {__version__}")
        raise typer.Exit()


@app.callback(context_settings={"help_option_names": ["-h", "--help"]})
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit", metavar="")):
    """qdeploy: compile quantized neural networks to hls4ml firmware and TVM libraries, bit-exact."""


@app.command("compile")
def compile_cmd(model: str = typer.Argument(..., help="QONNX/ONNX file, or module:function returning a Brevitas model"),
                target: str = typer.Option("hls4ml", "--target", "-t", help="hls4ml, tvm-llvm, tvm-cuda or reference"),
                out: Path = typer.Option(..., "-o", "--out", help="artifact directory (must not exist)"),
                config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config"),
                golden: Optional[Path] = typer.Option(None, "--golden", help=".npy/.npz golden inputs"),
                golden_layout: str = typer.Option("source", "--golden-layout",
                                                  help="layout of --golden: 'source' (the model's: NCHW, NCL, NC) or "
                                                       "'channels-last' (NHWC, NLC); never guessed from the shapes"),
                force: bool = typer.Option(False, "--force",
                                           help="replace an existing artifact directory (only a qdeploy artifact)", metavar=""),
                allow_inexact: bool = typer.Option(False, "--allow-inexact",
                                                   help="exit 0 and keep the artifact even when fixed-point outputs differ "
                                                        "from the reference or the outputs differ from the source model by "
                                                        "more than float32 rounding (the report says inexact)", metavar=""),
                no_source_check: bool = typer.Option(False, "--no-source-check",
                                                     help="do not run the source model on the golden inputs (the report "
                                                          "says 'not checked'); for timing, or when it cannot run here",
                                                     metavar=""),
                memory_budget: Optional[str] = typer.Option(
                    None, "--memory-budget", help="peak activation memory budget: bytes (48KiB, 1.5MB, 49152) or a "
                    "fraction of the unrematerialized peak (0.8); recomputes tensors to fit (CP-SAT)"),
                input_type: Optional[str] = typer.Option(
                    None, "--input-type", help="fixed-point type of float model inputs (e.g. fixed<16,6,RND_CONV,SAT>) "
                    "when the model has no input quantizer; overrides the config's input_type"),
                part: Optional[str] = typer.Option(None, "--part", help="hls4ml: FPGA part (xcvu9p-flga2104-2L-e, or "
                                                   "vu9p, vu13p, ku115, u250, zcu102, pynq-z2); overrides the config"),
                clock_period: Optional[float] = typer.Option(None, "--clock-period", help="hls4ml: clock period in ns"),
                io_type: Optional[str] = typer.Option(None, "--io-type", help="hls4ml: io_parallel or io_stream"),
                strategy: Optional[str] = typer.Option(None, "--strategy", help="hls4ml: Latency, Resource or distributed_arithmetic (da4ml; Vitis/Vivado, io_parallel Dense, RF 1)"),
                reuse_factor: Optional[int] = typer.Option(
                    None, "--reuse-factor", help="hls4ml: reuse factor of every Dense/Conv layer (per layer: "
                    "hls4ml.reuse_factor {node: rf} in the config); one hls4ml cannot build becomes the closest it "
                    "can, reported"),
                mcpu: Optional[str] = typer.Option(
                    None, "--mcpu", help="tvm-llvm/tvm-cuda: CPU of the (host) code: x86-64 (default on x86-64: runs on "
                    "any x86-64), native (this machine's CPU), or an LLVM CPU name; overrides the config's tvm.mcpu"),
                mtriple: Optional[str] = typer.Option(
                    None, "--mtriple", help="tvm-llvm: LLVM triple to cross-compile for, e.g. aarch64-linux-gnu (needs "
                    "aarch64-linux-gnu-g++; the artifact is then not run here); overrides the config's tvm.mtriple"),
                cuda_arch: Optional[str] = typer.Option(
                    None, "--cuda-arch", help="tvm-cuda: GPU architecture, sm_80 (default) or sm_90 (any sm_XY); "
                    "overrides the config's tvm.arch"),
                tune: Optional[int] = typer.Option(
                    None, "--tune", min=1, help="tvm-llvm: meta-schedule tuning with N trials of a static entry at "
                    "--tune-batch (records stored in the artifact's tune/); the config's tvm.tune.trials"),
                tune_batch: Optional[int] = typer.Option(
                    None, "--tune-batch", min=1, help="tvm-llvm: the batch size --tune tunes for (default 256, "
                    "recorded); predict calls the tuned entry for batches of exactly that size; tvm.tune.batch"),
                tune_log: Optional[Path] = typer.Option(
                    None, "--tune-log", help="tvm-llvm: apply the tuning records of an earlier tuned artifact "
                    "(its directory or its tune/) instead of tuning; tvm.tune.log")):
    """Compile MODEL for a target; writes the artifact, manifest.json, report.json and report.md.

    Exit status: 0 success; 1 the artifact's fixed-point outputs differ from the reference (the
    artifact is still written), or the reference differs from the source model (QONNX/ONNX run by
    qonnx's executor, a module:function's module itself) beyond float32 rounding (nothing is written
    unless --allow-inexact); 2 bad input or compile error.
    """
    from .api import SourceMismatchError
    from .api import compile as do_compile
    from .fidelity import fidelity_sentence
    from .report import exactness_sentence
    try:
        # flags override the same keys of the config's hls4ml / tvm section
        sections = {"hls4ml": (("part", part), ("clock_period", clock_period), ("io_type", io_type),
                               ("strategy", strategy), ("reuse_factor", reuse_factor)),
                    "tvm": (("mcpu", mcpu), ("mtriple", mtriple), ("arch", cuda_arch))}
        given = {sec: {k: v for k, v in pairs if v is not None} for sec, pairs in sections.items()}
        tune_given = {k: v for k, v in (("trials", tune), ("batch", tune_batch),
                                        ("log", None if tune_log is None else str(tune_log))) if v is not None}
        if tune_given and target != "tvm-llvm":
            raise QDeployError(f"--tune/--tune-batch/--tune-log: meta-schedule tuning is for --target tvm-llvm, "
                               f"not {target}")
        if any(given.values()) or tune_given:
            from .api import load_config
            cfg = load_config(config)
            for sec, flags in given.items():
                if flags:
                    cfg[sec] = {**(cfg.get(sec) or {}), **flags}
            if tune_given:  # a config tune that is not a mapping is refused by the backend
                tvm_cfg = dict(cfg.get("tvm") or {})
                old = tvm_cfg.get("tune")
                tvm_cfg["tune"] = {**(old if isinstance(old, dict) else {}), **tune_given} if old is None or \
                    isinstance(old, dict) else old
                cfg["tvm"] = tvm_cfg
            config = cfg
        with _progress() as progress:
            res = do_compile(model, target=target, out_dir=out, config=config, golden=golden, force=force,
                             memory_budget=memory_budget, golden_layout=golden_layout, allow_inexact=allow_inexact,
                             source_check=not no_source_check, input_type=input_type, progress=progress)
    except SourceMismatchError as e:
        typer.echo(f"fidelity vs source: {fidelity_sentence(e.fidelity)}")
        typer.echo(f"error: {e.one_line()}; nothing was written", err=True)
        raise typer.Exit(1)
    except Exception as e:  # one line, never a library traceback
        _fail(e)
    ex = res.report["exactness"]
    typer.echo(f"compiled {res.report['model']} -> {target} in {out} "
               f"({res.report['totals']['nodes']} nodes, {res.report['totals']['bops']:.4g} BOPs/sample)")
    for note in res.report.get("notes", []):
        typer.echo(f"note: {note}")
    for w in (res.report.get("estimate") or {}).get("warnings") or []:
        if w not in res.report.get("notes", []):
            typer.echo(f"WARNING (estimate): {w}")
    rm = res.report.get("remat")
    if rm:
        typer.echo(f"memory: peak {rm['peak_before']} B -> {rm['peak_after']} B (budget {rm['budget_bytes']} B, "
                   f"{rm['packing']} packing), compute overhead {rm['overhead_pct']:.2f}%, {len(rm['recomputed'])} "
                   f"recomputed node(s), solve {rm['solve_s']:.2f} s, {rm['status']}")
    typer.echo(f"exactness vs reference: {exactness_sentence(ex)}")
    fid = res.report.get("fidelity") or {}
    typer.echo(f"fidelity vs source: {fidelity_sentence(fid)}")
    failed = False
    if ex.get("fixed_mismatches", 0) and not allow_inexact:
        div = (ex.get("divergence") or {}).get("sentence")
        typer.echo("error: fixed-point outputs differ from the reference" + (f"; {div}" if div else "")
                   + " (see report.md); --allow-inexact accepts this", err=True)
        failed = True
    if failed:
        raise typer.Exit(1)


@contextlib.contextmanager
def _progress():
    """A ``progress(stage)`` callback for :func:`qdeploy.api.compile`: on a terminal, a rich spinner on
    stderr naming the stage and the seconds elapsed; ``WARNING:`` lines are printed (stderr) as
    they come, terminal or not."""
    import sys
    import time as _time
    from rich.console import Console
    console = Console(stderr=True)
    t0 = _time.perf_counter()
    if not console.is_terminal:
        def say(stage):
            if stage.startswith("WARNING:"):
                typer.echo(stage, err=True)
        yield say
        return
    with console.status("compiling") as status:
        def say(stage):
            if stage.startswith("WARNING:"):
                console.print(stage, markup=False, highlight=False)
            else:
                status.update(f"{stage} ({_time.perf_counter() - t0:.0f} s)")
        yield say
    sys.stderr.flush()


LAYOUT_HELP = ("layout of the arrays: 'source' (the layout the artifact declares, the source model's: NCHW, NCL, "
               "NC) or 'channels-last' (NHWC, NLC); never guessed from the shapes")


@app.command("run")
def run_cmd(artifact: Path = typer.Argument(..., help="artifact directory from `qdeploy compile`"),
            input: Path = typer.Option(..., "--input", "-i", help=".npy float32 input, batch first (.npz: one array "
                                       "per input name)"),
            output: Path = typer.Option(..., "--output", "-o", help=".npy to write (one output), or .npz (one array "
                                        "per output name; needed when the model has several outputs)"),
            layout: str = typer.Option("source", "--layout", help=LAYOUT_HELP + "; outputs are written in it too")):
    """Run a compiled artifact on INPUT and save its real-valued outputs (every one of them)."""
    from .api import load_array_file
    from .runtime import CompiledModel
    if (artifact / "plan.json").is_file():  # a multi-stage program (qdeploy compile-early-exit)
        if plan_kind(artifact) == "dynamic":
            _fail(QDeployError(f"{artifact} is a dynamic program (qdeploy.dynamic.compile_dynamic), which `qdeploy run` "
                               "does not run: load it in Python with qdeploy.runtime.dynamic.DynamicModel.load(dir)"))
        if layout != "source":
            _fail(QDeployError("--layout: a multi-stage program takes its inputs in the source layout only"))
        _run_program(artifact, input, output)
        return
    try:
        m = CompiledModel.load(artifact)
        names = list(m.graph.outputs)
        output = output_path(output, names)
        x = load_array_file(input, m.graph.inputs)
        y = m.predict(x, layout=layout)
        ys = y if len(names) > 1 else [y]
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            if output.suffix == ".npz":
                np.savez(output, **dict(zip(names, ys)))
            else:
                np.save(output, ys[0])
        except OSError as e:  # e.g. a parent that is a file, no permission
            raise QDeployError(f"cannot write the outputs to {output}: {e.strerror or e}") from None
    except Exception as e:  # one line, never a library traceback
        _fail(e)
    typer.echo(f"wrote {output}: " + ", ".join(f"{n} {np.shape(a)}" for n, a in zip(names, ys)))


def plan_kind(program: Path) -> str | None:
    """The ``kind`` of a multi-stage program's ``plan.json`` (``"early_exit"``, ``"dynamic"``), or
    None when the file is unreadable (loading it then gives the detailed error)."""
    import json
    try:
        plan = json.loads((program / "plan.json").read_text())
    except (OSError, ValueError):
        return None
    return plan.get("kind") if isinstance(plan, dict) else None


def output_path(output: Path, names: list) -> Path:
    """Where `qdeploy run` writes the outputs ``names``: ``.npy`` (one output) or ``.npz`` as
    given; another name gets ``.npy`` appended for one output, ``.npz`` for several.

    Raises:
        QDeployError: a ``.npy`` path for a model with several outputs; an existing directory; a
            path under a regular file.
    """
    if output.is_dir():
        raise QDeployError(f"--output {output} is a directory: give a file path, e.g. {output / 'y.npy'}")
    for parent in output.parents:
        if parent.exists():
            if not parent.is_dir():
                raise QDeployError(f"cannot write the outputs to {output}: {parent} is a file, not a directory")
            break
    if output.suffix == ".npy" and len(names) > 1:
        raise QDeployError(f"the model has {len(names)} outputs ({', '.join(names)}): a .npy file holds one array; "
                           f"give an .npz output path (one array per output name)")
    if output.suffix in (".npy", ".npz"):
        return output
    return output.with_name(output.name + (".npz" if len(names) > 1 else ".npy"))


def _run_program(program: Path, input: Path, output: Path) -> None:
    """`qdeploy run` on a multi-stage program: predictions to OUTPUT, exit indices next to it."""
    from .api import load_array_file
    from .runtime.multistage import MultiStageModel
    try:
        m = MultiStageModel.load(program)
        x = load_array_file(input, m.program.inputs)
        pred, exit_idx = m.predict(x)
        output_path(output, ["prediction"])  # refuses a directory or a path under a file
        output = output if output.suffix == ".npy" else output.with_name(output.name + ".npy")
        exits_out = output.with_name(output.stem + "_exit.npy")
        output.parent.mkdir(parents=True, exist_ok=True)
        np.save(output, pred)
        np.save(exits_out, exit_idx)
    except Exception as e:  # one line, never a library traceback
        _fail(e)
    counts = ", ".join(f"{v}: {int(np.sum(exit_idx == k))}" for k, v in enumerate(m.exit_values()))
    typer.echo(f"wrote {output} {np.shape(pred)} (predicted class) and {exits_out} (exit index); exits {counts}")


# --- early exit ---------------------------------------------------------------------------------
@app.command("inspect")
def inspect_cmd(model: str = typer.Argument(..., help="QONNX/ONNX file, module:function, or an artifact directory"),
                optimized: bool = typer.Option(False, "--optimized", help="print the IR after the default passes", metavar="")):
    """Print the IR of MODEL (one node a line, with exact types)."""
    from .api import load
    from .compiler.ir.graph import Graph
    try:
        p = Path(model)
        if p.is_dir() and (p / "ir" / "model.json").exists():
            g = Graph.load(str(p / "ir" / "model"))
        else:
            g = load(model)
            if optimized:
                from .passes import PassManager, default_pipeline
                g = PassManager(default_pipeline()).run(g)
    except Exception as e:  # one line, never a library traceback
        _fail(e)
    typer.echo(str(g))


@app.command("estimate")
def estimate_cmd(model: str = typer.Argument(..., help="QONNX/ONNX file or module:function"),
                 target: str = typer.Option("hls4ml", "--target", "-t", help="hls4ml or asic"),
                 part: Optional[str] = typer.Option(None, "--part", help="FPGA part (hls4ml; default xcvu9p): vu9p, vu13p, "
                                                    "ku115, u250, zcu102, pynq-z2"),
                 clock_period: Optional[float] = typer.Option(None, "--clock-period", help="ns (hls4ml default 5, asic default 25)"),
                 reuse_factor: Optional[int] = typer.Option(None, "--reuse-factor", help="hls4ml reuse factor (default 1; "
                                                            "per layer: hls4ml.reuse_factor in --config)"),
                 strategy: Optional[str] = typer.Option(None, "--strategy", help="Latency (default), Resource or distributed_arithmetic (da4ml adder graphs, 0 DSP)"),
                 io_type: Optional[str] = typer.Option(None, "--io-type", help="io_parallel (default) or io_stream"),
                 node_nm: Optional[int] = typer.Option(None, "--node", help="ASIC technology node: 65 (default), 45 or 28 nm"),
                 input_type: Optional[str] = typer.Option(None, "--input-type", help="type of float inputs"),
                 config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config: its hls4ml (or asic) "
                                                       "section and input_type, as for compile; flags given override it"),
                 as_json: bool = typer.Option(False, "--json", help="print one JSON object (total, layers)", metavar="")):
    """Estimate resources and latency (hls4ml) or area/power/energy (asic) without vendor tools."""
    import json as _json
    from .api import estimate, load_config
    try:
        file_cfg = load_config(config) if config else {}
        if input_type is None and file_cfg.get("input_type") not in (None, "auto"):
            input_type = file_cfg["input_type"]
        if target == "asic":  # flags given override the config's asic section; the estimator has the defaults
            cfg = {**dict(file_cfg.get("asic") or {}),
                   **{k: v for k, v in (("node_nm", node_nm), ("clock_period", clock_period)) if v is not None}}
        else:
            flags = {"part": part, "clock_period": clock_period, "reuse_factor": reuse_factor, "strategy": strategy,
                     "io_type": io_type}
            h = {k: v for k, v in dict(file_cfg.get("hls4ml") or {}).items() if k in flags}
            cfg = {**h, **{k: v for k, v in flags.items() if v is not None}}
        est = estimate(model, target=target, config=cfg, input_type=input_type)
    except Exception as e:  # one line, never a library traceback
        _fail(e)
    if as_json:
        typer.echo(_json.dumps(est, default=str))
        return
    from .backends.hls4ml.estimate import format_table
    typer.echo(format_table(est))
    util = (est.get("total") or {}).get("utilization_pct")
    if util:
        typer.echo(f"utilization of {est.get('part', {}).get('name', part) if isinstance(est.get('part'), dict) else part}: "
                   + ", ".join(f"{k.upper()} {v:.1f}%" for k, v in util.items()))
    typer.echo(est.get("note", ""))


# --- search: Hessian-guided mixed-precision search -------------------------------------------


from .cli_early_exit import compile_early_exit_cmd  # noqa: E402  (after app: the command modules use cli_common only)
from .cli_search import search_cmd  # noqa: E402

app.command("compile-early-exit")(compile_early_exit_cmd)
app.command("search")(search_cmd)


golden_app = typer.Typer(help="Golden-output record and check (for CI).", no_args_is_help=True)
app.add_typer(golden_app, name="golden")


@golden_app.command("record")
def golden_record(model_or_out: str = typer.Argument(..., help="artifact directory, or a model file / module:function"),
                  out: Path = typer.Option(..., "-o", "--out", help=".npz golden file to write"),
                  input: Optional[Path] = typer.Option(None, "--input", "-i", help=".npy inputs (batch first)"),
                  config: Optional[Path] = typer.Option(None, "--config", "-c"),
                  samples: int = typer.Option(64, help="random inputs when no --input and no artifact inputs"),
                  seed: int = typer.Option(0),
                  layout: str = typer.Option("source", "--layout", help="layout of --input: " + LAYOUT_HELP)):
    """Store inputs and reference outputs (codes and reals), model hash and versions."""
    from .golden import record
    try:
        x = np.load(input) if input else None
        s = record(model_or_out, out, inputs=x, config=config, samples=samples, seed=seed, layout=layout)
    except Exception as e:  # one line, never a library traceback
        _fail(e)
    typer.echo(f"recorded {s['samples']} samples, outputs {', '.join(s['outputs'])} -> {out}")


@golden_app.command("check")
def golden_check(artifact: Path = typer.Argument(..., help="artifact directory"),
                 golden: Path = typer.Argument(..., help="golden .npz from `qdeploy golden record`"),
                 tolerance: float = typer.Option(0.0, help="allowed absolute error (real units); 0 = bit-exact")):
    """Run ARTIFACT on the golden inputs; exit 1 on any mismatch."""
    from .golden import check
    if tolerance < 0:
        _fail(QDeployError(f"--tolerance must be >= 0, got {tolerance}"))
    try:
        r = check(artifact, golden, tolerance)
    except Exception as e:  # one line, never a library traceback
        _fail(e)
    if not r.digest_matches:
        typer.echo("note: the artifact's IR digest differs from the one the golden file was recorded from")
    if r.ok:
        typer.echo(f"golden check passed: {r.samples} samples, 0 mismatches, max abs error {r.max_abs_error:.3g}")
        return
    f = r.first
    typer.echo(f"golden check FAILED: {r.mismatches} of {r.samples} samples mismatch; first: sample {f['sample']}, "
               f"output {f['output']!r} index {f['index']}: expected {f['expected']!r}"
               + (f" (code {f['expected_code']})" if f['expected_code'] is not None else "")
               + f", got {f['actual']!r}" + (f" (code {f['actual_code']})" if f['actual_code'] is not None else ""),
               err=True)
    raise typer.Exit(1)


def _terminate(signum, frame):
    """SIGTERM (e.g. a CI job timeout) unwinds like Ctrl-C, so staging directories are removed."""
    raise SystemExit(128 + signum)


def main() -> None:
    import signal
    try:
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (embedded use): leave the default
        pass
    try:
        app()
    except QDeployError as e:  # pragma: no cover - typer handles most
        typer.echo(f"error: {e.one_line()}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
