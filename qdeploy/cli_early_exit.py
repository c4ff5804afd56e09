"""``qdeploy compile-early-exit``: a multi-stage early-exit program from the command line
(:func:`qdeploy.early_exit.compile_early_exit`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import typer

from .cli_common import fail as _fail
from .compiler.errors import QDeployError

__all__ = ["compile_early_exit_cmd"]


def compile_early_exit_cmd(
        model: str = typer.Argument(..., help="QONNX/ONNX file (one output per exit) or module:function"),
        target: str = typer.Option("hls4ml", "--target", "-t", help="hls4ml, tvm-llvm or reference (every stage)"),
        out: Path = typer.Option(..., "-o", "--out", help="program directory (must not exist)"),
        exits: Optional[str] = typer.Option(None, "--exits",
                                            help="exit value names, earliest first, comma-separated "
                                                 "(default: the model outputs in order)"),
        gate: str = typer.Option("never", "--gate", help="max_softmax, entropy, margin or never (early exits off: "
                                 "the program equals the unsplit model)"),
        thresholds: Optional[str] = typer.Option(None, "--thresholds",
                                                 help="one threshold per early exit, comma-separated (or one for all): "
                                                      "probability (max_softmax), normalized entropy (entropy), "
                                                      "logit margin (margin)"),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (applies to every stage)"),
        golden: Optional[Path] = typer.Option(None, "--golden", help=".npy/.npz golden inputs of the whole model"),
        labels: Optional[Path] = typer.Option(None, "--labels",
                                              help=".npy labels of the golden inputs: the report adds the exit "
                                                   "distribution and accuracy on them"),
        force: bool = typer.Option(False, "--force", help="replace an existing multi-stage program directory", metavar=""),
        allow_inexact: bool = typer.Option(False, "--allow-inexact", help="keep the program even when its exits differ "
                                           "from the source model beyond float32 rounding", metavar=""),
        no_source_check: bool = typer.Option(False, "--no-source-check", help="do not run the source model", metavar="")):
    """Split an early-exit MODEL at its exits, compile each stage for a target, write plan.json and report.md.

    Run it with `qdeploy run OUT -i x.npy -o pred.npy` (or qdeploy.runtime.multistage.MultiStageModel).
    Exit status: 0 success; 1 a stage's fixed-point outputs differ from the reference; 2 bad input or
    compile error."""
    from .api import load_array_file
    from .early_exit import compile_early_exit, evaluate, gates_from_thresholds, program_markdown
    written = False
    try:
        ex_list = [e.strip() for e in exits.split(",") if e.strip()] if exits else None
        try:
            ts = [float(t) for t in thresholds.split(",") if t.strip()] if thresholds else []
        except ValueError:
            raise QDeployError(f"--thresholds {thresholds!r}: expected numbers, comma-separated (e.g. 0.9,0.8)") from None
        if gate not in ("never", "always") and not ts:
            raise QDeployError(f"--gate {gate} needs --thresholds (one per early exit, or one for all)")
        gold = load_array_file(golden) if golden is not None else None
        y = np.load(labels, allow_pickle=False) if labels is not None else None
        if y is not None and gold is None:
            raise QDeployError("--labels needs --golden (the inputs they label)")
        msm = compile_early_exit(model, target, out, exits=ex_list, golden=gold, config=config, force=force,
                                 allow_inexact=allow_inexact, source_check=not no_source_check)
        written = True  # from here on a failure must not leave a program with the wrong gates behind
        msm = msm.with_gates(gates_from_thresholds(msm, gate, ts))
        msm.save_plan()
        ev = None
        if y is not None:
            if isinstance(gold, dict):
                raise QDeployError("--labels needs a single-input model (a .npy --golden)")
            ev = evaluate(msm, gold, y)
        (Path(out) / "report.md").write_text(program_markdown(msm, ev))
    except Exception as e:  # one line, never a library traceback
        from .api import SourceMismatchError
        if isinstance(e, SourceMismatchError):  # a failed check (exit 1), not bad input
            typer.echo(f"error: {e.one_line()}; nothing was written", err=True)
            raise typer.Exit(1)
        if written:
            import shutil
            shutil.rmtree(out, ignore_errors=True)
        _fail(e)
    stages = msm.plan["stages"]
    typer.echo(f"compiled {msm.plan['meta'].get('model', model)} -> {target} in {out}: {len(stages)} stages, "
               f"exits {', '.join(msm.exit_values())}")
    from .early_exit import gate_text
    typer.echo("gates: " + ", ".join(gate_text(g) for g in msm.gates))
    from .fidelity import fidelity_sentence
    typer.echo(f"fidelity vs source: {fidelity_sentence(msm.plan['meta'].get('fidelity') or {})}")
    if ev is not None:
        typer.echo(f"golden set: accuracy {ev['accuracy']:.4f}, exit distribution "
                   f"{' / '.join(f'{f:.1%}' for f in ev['exit_fraction'])}, mean BOPs {ev['mean_bops']:.4g} "
                   f"({ev['speedup_vs_final']:.2f}x vs the final exit alone)")
    bad = [s["name"] for s in stages if not s["exactness"]["bit_exact"]]
    if bad:
        typer.echo(f"error: stage(s) {', '.join(bad)} differ from the reference (see report.md)", err=True)
        raise typer.Exit(1)
# --- end early exit ----------------------------------------------------------------------------
