"""``qdeploy search``: the Hessian-guided mixed-precision search from the command line
(:func:`qdeploy.search`, :mod:`qdeploy.compiler.quantization.search`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .cli_common import fail as _fail
from .compiler.errors import QDeployError

__all__ = ["search_cmd"]


def search_cmd(recipe: str = typer.Argument(..., help="module:function, path.py:function or YAML returning the float model and data"),
               out: Path = typer.Option(..., "-o", "--out", help="output directory for the report and QONNX models"),
               budget: list[str] = typer.Option(..., "--budget", "-b", help="one budget point, e.g. bops=1.2e6, size=uniform:4, or bops=..,size=.. (repeat for several)"),
               bits: str = typer.Option("2,3,4,5,6,7,8", help="candidate weight bit widths"),
               act_bits: str = typer.Option("", "--act-bits", help="candidate activation bit widths (default: --bits; 'fixed' = 8-bit activations, 'fixed:B' = B-bit activations: weights-only search)"),
               tie: list[str] = typer.Option([], "--tie", help="comma-separated layer names that share bit widths (repeatable)"),
               probes: int = typer.Option(100, help="Hutchinson probe cap"),
               tol: float = typer.Option(1e-3, help="relative tolerance of the trace estimate"),
               sensitivity: str = typer.Option("hessian+measured", "--sensitivity", help="layer sensitivity: hessian+measured (max of the HAWQ-V3 Hessian estimate and the measured loss increase), hessian, or measured"),
               qat_epochs: Optional[int] = typer.Option(None, "--qat-epochs", help="QAT epochs per allocation (default: the recipe's qat.epochs, else 15)"),
               qat_seeds: int = typer.Option(1, "--qat-seeds", help="QAT runs per allocation (mean accuracy)"),
               seed: int = typer.Option(0),
               part: str = typer.Option("xcvu9p", "--part", help="FPGA part for lut/ff/dsp/latency budgets (hls4ml estimator)"),
               clock_period: float = typer.Option(5.0, "--clock-period", help="clock period in ns for latency budgets"),
               reuse_factor: int = typer.Option(1, "--reuse-factor", help="hls4ml reuse factor for estimator budgets"),
               strategy: str = typer.Option("Latency", "--strategy", help="hls4ml strategy for estimator budgets"),
               no_progress: bool = typer.Option(False, "--no-progress", help="no progress bars (for logs and CI)", metavar=""),
               force: bool = typer.Option(False, "--force", help="replace an earlier search output in OUT (never another folder)", metavar=""),
               workers: Optional[str] = typer.Option(None, "--workers", help="processes for the QAT fine-tunes (independent jobs): 'auto' = one per CPU (at most one per job), N = N worker processes, 1 = in this process (default: $QDEPLOY_QAT_WORKERS, else auto)"),
               ray: Optional[str] = typer.Option(None, "--ray", help="run the QAT jobs on Ray: 'auto' (the running cluster), 'local' (start one with --workers CPUs) or a cluster address; needs pip install 'qdeploy[ray]'"),
               compare: bool = typer.Option(False, "--compare", help="also fine-tune, per budget, the trace-only (HAWQ-V3 Omega alone), random and uniform-at-or-above allocations; search_report.md and pareto.png show the four rows (not exported)", metavar="")):
    """Hessian sensitivity -> ILP bit allocation per budget -> QAT -> search_report.json/.md, pareto.png, QONNX.

    Budget kinds: bops, size (weight bits), and through the hls4ml estimator lut, ff, dsp, bram_18k,
    latency_cycles, latency_ns (per-layer Dense/Conv costs; --part/--clock-period/--reuse-factor).
    --compare adds the Hessian / trace-only / random / uniform comparison (more QAT jobs)."""
    from .api import search as do_search
    try:
        def ints(t, opt):
            try:
                return [int(b) for b in t.split(",") if b.strip()]
            except ValueError:
                raise QDeployError(f"{opt} {t!r}: expected comma-separated integers, e.g. 2,3,4,8") from None

        ab, abf = None, 8
        if act_bits == "fixed":
            ab = ()
        elif act_bits.startswith("fixed:"):
            ab = ()
            try:
                abf = int(act_bits.split(":", 1)[1])
            except ValueError:
                abf = -1
            if not 2 <= abf <= 32:
                raise QDeployError(f"--act-bits {act_bits!r}: fixed:B needs an integer B in 2..32")
        elif act_bits:
            if act_bits.startswith("fixed"):
                raise QDeployError(f"--act-bits {act_bits!r}: expected 'fixed', 'fixed:B' or a list like 2,4,8")
            ab = ints(act_bits, "--act-bits")
            if not ab:
                raise QDeployError(f"--act-bits {act_bits!r}: the list of candidate bit widths is empty")
        w_list = ints(bits, "--bits")
        est_cfg = {"part": part, "clock_period": clock_period, "reuse_factor": reuse_factor, "strategy": strategy}
        rep = do_search(recipe, out, budgets=list(budget), w_bits=w_list, a_bits=ab, act_bits_fixed=abf,
                        estimator=est_cfg,
                        ties=[t.split(",") for t in tie] or None, probes=probes, tol=tol, qat_epochs=qat_epochs,
                        qat_seeds=qat_seeds, seed=seed, progress=not no_progress, sensitivity_mode=sensitivity,
                        force=force, workers=workers if workers in (None, "auto") else _workers_opt(workers), ray=ray,
                        compare=compare)
    except Exception as e:  # one line, never a library traceback
        _fail(e)
    key = "test_acc" if "test" in rep["float_accuracy"] else "val_acc"
    for i, b in enumerate(rep["budgets"]):
        h, u = b["hessian"], b["uniform"]
        hwc = lambda c: "".join(f", {'weight bits' if k == 'size' else k} {c[k]:.4g}"
                                for k in b["budget_resolved"] if k != "bops" and k in c)
        line = f"budget {i} {b['budget']}: Hessian {h['costs']['bops']:.4g} BOPs{hwc(h['costs'])}, {key} {h[key]:.4f}"
        if u:
            line += (f" | uniform {u['bits']}-bit {u['allocation']['costs']['bops']:.4g} BOPs"
                     f"{hwc(u['allocation']['costs'])}, {key} {u[key]:.4f}")
        typer.echo(line)
        if "compare" in b:
            typer.echo("  compare: " + ", ".join(f"{row} {r['costs']['bops']:.4g} BOPs {key} {r[key]:.4f}"
                                                 for row, r in b["compare"].items()))
    fo = rep.get("qat_fanout") or {}
    if fo:
        typer.echo(f"QAT: {fo['jobs']} jobs on {fo['engine']} ({fo['workers']} worker(s)), {fo['seconds']:.1f} s"
                   + (f", {len(fo['retried'])} retried: " + "; ".join(f"{r['job']} ({r['reason']})" for r in fo["retried"])
                      if fo["retried"] else ""))
    typer.echo(f"wrote {out / 'search_report.md'}, search_report.json, pareto.png, models/")


def _workers_opt(text: str) -> int:
    """``--workers`` as an int (>= 1 checked by the search); a non-integer is a one-line error."""
    try:
        return int(text)
    except ValueError:
        raise QDeployError(f"--workers {text!r}: expected a positive integer or 'auto'") from None
