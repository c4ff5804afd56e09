"""Early-exit programs, user-facing layer: compile, calibrate, evaluate, report.

    from qdeploy.early_exit import compile_early_exit, calibrate_gates, evaluate, render_report
    msm = compile_early_exit("branchy.onnx", "tvm-llvm", "out/branchy-tvm", golden=x_val)
    cal = calibrate_gates(msm, x_val, y_val, rule="max_softmax", max_drop=1.0)   # or budget=...
    msm = msm.with_gates(cal["gates"]); msm.save_plan()
    pred, exit_idx = msm.predict(x_test)

``compile_early_exit`` imports the model, runs the default passes on the whole graph (so every
type is final), splits it at the exits (:func:`qdeploy.passes.early_exit.split_exits`) and
compiles each stage with :func:`qdeploy.compile` as its own artifact (for hls4ml: its own
project, i.e. one kernel per stage), each checked bit for bit against the reference on the
golden inputs' carried tensors.  The directory holds ``plan.json`` + ``ir/program`` + one
artifact per stage (:mod:`qdeploy.runtime.multistage`).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

from .compiler.errors import QDeployError
from .compiler.ir.types import FixedType
from .compiler.reference import execute

__all__ = ["compile_early_exit", "exit_codes", "calibrate_gates", "evaluate", "render_report", "gates_from_thresholds",
           "program_markdown"]


def _real(graph, name, codes):
    t = graph.value(name).dtype
    return t.to_real(codes) if isinstance(t, FixedType) else np.asarray(codes, dtype=np.float32)


def compile_early_exit(model, target: str, out_dir, *, exits=None, golden=None, gates=None, config=None,
                       example_input=None, force: bool = False, allow_inexact: bool = False,
                       source_check: bool = True):
    """Compile an early-exit model into a multi-stage program directory.

    Args:
        model: anything :func:`qdeploy.load` takes whose outputs are the exits' logits (or name
            them with ``exits``).
        target: ``reference``, ``tvm-llvm`` or ``hls4ml``; every stage is compiled for it.
        out_dir: the program directory (must not exist unless ``force``).
        golden: golden inputs of the whole model (batch first, source layout); each stage's
            golden set is the reference's carried tensors on them.  Default: the config's random
            golden samples.
        gates: one gate dict per exit (:func:`qdeploy.runtime.multistage.make_gate`); default
            "never" for the early exits (the program then equals the unsplit model) and
            "always" for the last.
        allow_inexact, source_check: as for :func:`qdeploy.api.compile`: the whole (unsplit)
            program's exits are compared with the source model (QONNX/ONNX or torch module) on the
            golden inputs (:func:`qdeploy.fidelity.check_source`); the result is the plan's
            ``meta.fidelity``.
    Returns:
        the loaded :class:`~qdeploy.runtime.multistage.MultiStageModel`.
    Raises:
        SourceMismatchError: the program differs from the source beyond float32 rounding (unless
            ``allow_inexact``); nothing is written.
        QDeployError: import/compile errors, :class:`~qdeploy.passes.early_exit.EarlyExitError`
            for exits that cannot be identified or ordered.
    """
    from . import api
    from .runtime.artifact import check_replaceable, publish, staging_dir
    from .passes import PassManager, default_pipeline
    from .passes.early_exit import split_exits
    from .runtime.multistage import PLAN_FORMAT, MultiStageModel

    cfg = api.load_config(config)
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not force:
        raise QDeployError(f"output directory {out_dir} exists (use force=True to replace it)")
    if out_dir.exists():
        check_replaceable(out_dir, model, is_ours=lambda d: (d / "plan.json").is_file(),
                          kind="a multi-stage program (no plan.json)")
    from .compiler.frontends import is_module_spec, resolve_module_spec
    from .fidelity import check_source
    if is_module_spec(model):  # resolved once: the module exported is the module run as the source
        model, example_input = resolve_module_spec(model)
    graph = graph_src = api.load(model, example_input)
    user = None if golden is None else api.golden_arrays(graph_src, golden)
    feeds_real = feeds_src = api.golden_feeds(graph, user, cfg)
    graph = PassManager(default_pipeline(cfg.get("input_type"), feeds_real)).run(graph)
    prog = split_exits(graph, exits)
    feeds_real = {k: v for k, v in feeds_real.items() if k in graph.inputs}
    env = execute(graph, feeds_real, keep=True)
    fidelity = check_source(model, graph_src, graph, feeds_src, user, {o: env[o] for o in graph.outputs},
                            enabled=source_check)
    if fidelity.get("checked") and not fidelity["ok"]:
        if not allow_inexact:
            raise api.SourceMismatchError(fidelity)
        fidelity["accepted_inexact"] = True
    tmp = staging_dir(out_dir)
    try:
        stages_json, steps = [], []
        cum = prog.cum_bops
        for k, sg in enumerate(prog.stages):
            name = f"stage{k}"
            gold = {i: _real(graph, i, env[i]) for i in sg.inputs}
            res = api.compile(sg, target=target, out_dir=tmp / name, config=cfg, golden=gold, optimize=False,
                              golden_layout="channels-last")  # carried tensors: IR arrays
            est = (res.report.get("estimate") or {}).get("total") or {}
            ex = res.report["exactness"]
            stages_json.append({
                "name": name, "dir": name, "inputs": list(sg.inputs), "outputs": list(sg.outputs),
                "carried_out": prog.carried[k],
                "cost": {"bops": prog.bops[k], "cum_bops": cum[k],
                         "latency_ns_est": est.get("latency_ns"), "latency_cycles_est": est.get("latency_cycles")},
                "exactness": {"samples": ex["samples"], "mismatches": ex["mismatches"], "bit_exact": ex["bit_exact"]},
            })
            g = (gates[k] if gates is not None else ({"rule": "never"} if k < len(prog.stages) - 1
                                                      else {"rule": "always"}))
            steps.append({"run": name, "exit": {"value": prog.exits[k], "gate": g}})
        plan = {"format": PLAN_FORMAT, "kind": "early_exit", "target": target, "inputs": list(graph.inputs),
                "exits": prog.exits, "stages": stages_json, "steps": steps,
                "meta": {"model": graph.name, "final_only_bops": prog.final_only_bops,
                         "graph_digest": graph.digest(), "fidelity": fidelity}}
        (tmp / "ir").mkdir()
        graph.save(str(tmp / "ir" / "program"))
        (tmp / "plan.json").write_text(json.dumps(plan, indent=1))
        publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return MultiStageModel.load(out_dir)


def exit_codes(msm, x) -> dict:
    """Runtime arrays of every exit on ``x``, from the reference run of the whole program graph."""
    from .runtime.compiled import user_feeds
    g = msm.program
    out = execute(g, user_feeds(g, x), codes=True, keep=True)
    return {v: out[v] for v in msm.exit_values()}


def _stats(msm, x, y, rule):
    from .runtime.multistage import confidence
    codes = exit_codes(msm, x)
    vals = msm.exit_values()
    conf = [confidence(rule, codes[v], msm.program.value(v).dtype) for v in vals[:-1]]
    correct = [np.argmax(codes[v], axis=1) == np.asarray(y) for v in vals]
    cum = [s["cost"]["cum_bops"] for s in msm.plan["stages"]]
    return conf, correct, cum


def calibrate_gates(msm, x, y, rule: str = "max_softmax", *, max_drop=None, budget=None, **kw) -> dict:
    """Calibrate per-exit gates on a validation set (``x``, ``y``) with
    :func:`qdeploy.passes.early_exit.calibrate` (``max_drop`` accuracy points or a mean-BOPs
    ``budget``).  Returns its dict plus ``gates`` (one per step, for
    :meth:`MultiStageModel.with_gates`)."""
    from .passes.early_exit import calibrate
    from .runtime.multistage import make_gate
    conf, correct, cum = _stats(msm, x, y, rule)
    try:
        cal = calibrate(conf, correct, cum, max_drop=max_drop, budget=budget, **kw)
    except ValueError as e:
        raise QDeployError(str(e)) from None
    vals = msm.exit_values()
    gates = [make_gate(rule, msm.program.value(v).dtype, level=lv) for v, lv in zip(vals[:-1], cal["levels_raw"])]
    cal["gates"] = gates + [{"rule": "always"}]
    cal["rule"] = rule
    cal.pop("levels_raw")
    return cal


def evaluate(msm, x, y, pred=None, exit_idx=None) -> dict:
    """Exit distribution, accuracy per exit and overall, mean/worst cost (BOPs and estimated
    latency, per-stage estimates weighted by the exit distribution) of ``msm`` on (x, y).
    Runs ``msm.predict`` unless ``pred``/``exit_idx`` are given."""
    if pred is None:
        pred, exit_idx = msm.predict(x)
    y = np.asarray(y)
    K = len(msm.plan["steps"])
    n = len(y)
    stages = msm.plan["stages"]
    cum = np.array([s["cost"]["cum_bops"] for s in stages], dtype=np.float64)
    lat = [s["cost"].get("latency_ns_est") for s in stages]
    cum_lat = np.cumsum(lat) if all(v is not None for v in lat) else None
    counts = [int(np.sum(exit_idx == k)) for k in range(K)]
    final_only = float(msm.plan["meta"]["final_only_bops"])
    mean_cost = float(cum[exit_idx].mean())
    return {
        "n": n, "gates": msm.gates, "exit_counts": counts, "exit_fraction": [c / n for c in counts],
        "accuracy": float(np.mean(pred == y)),
        "accuracy_at_exit": [float(np.mean(pred[exit_idx == k] == y[exit_idx == k])) if counts[k] else None
                             for k in range(K)],
        "mean_bops": mean_cost, "worst_bops": float(cum[exit_idx.max()]),
        "worst_case_bops": float(cum[-1]), "final_only_bops": final_only,
        "speedup_vs_final": final_only / mean_cost if mean_cost else math.inf,
        "mean_latency_ns_est": float(cum_lat[exit_idx].mean()) if cum_lat is not None else None,
        "worst_latency_ns_est": float(cum_lat[exit_idx.max()]) if cum_lat is not None else None,
    }


def gate_text(g: dict) -> str:
    """Short text of a gate dict (:func:`qdeploy.runtime.multistage.make_gate`): ``always``,
    ``never``, ``<rule>>=<threshold>`` or, for entropy, ``H/lnK<=<threshold>``."""
    if g["rule"] in ("always", "never"):
        return g["rule"]
    return f"{g['rule']}>={g['threshold']:.4g}" if g["rule"] != "entropy" else f"H/lnK<={g['threshold']:.4g}"


def render_report(rows: list, title: str = "Early-exit report") -> str:
    """Markdown table of :func:`evaluate` dicts (each may carry a ``label``)."""
    L = [f"# {title}", "", "| setting | gates | exit distribution | accuracy per exit (of those leaving) | accuracy | "
         "mean BOPs | worst BOPs | speedup vs final exit alone | mean latency est. (ns) |",
         "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dist = " / ".join(f"{f:.1%}" for f in r["exit_fraction"])
        accs = " / ".join("-" if a is None else f"{a:.3f}" for a in r["accuracy_at_exit"])
        lat = "-" if r.get("mean_latency_ns_est") is None else f"{r['mean_latency_ns_est']:.0f}"
        L.append(f"| {r.get('label', '')} | {', '.join(gate_text(g) for g in r['gates'][:-1])} | {dist} | {accs} | "
                 f"{r['accuracy']:.4f} | {r['mean_bops']:.4g} | {r['worst_bops']:.4g} | {r['speedup_vs_final']:.2f}x | "
                 f"{lat} |")
    return "\n".join(L) + "\n"


def gates_from_thresholds(msm, rule: str, thresholds) -> list:
    """One gate per step from a rule and one human threshold per early exit (probability for
    ``max_softmax``, normalized entropy for ``entropy``, real logit margin for ``margin``); the last
    step always exits.  ``rule`` ``never``/``always`` take no thresholds."""
    from .runtime.multistage import make_gate
    vals = msm.exit_values()
    if rule in ("never", "always"):
        if thresholds:
            raise QDeployError(f"gate {rule!r} takes no thresholds")
        return [{"rule": rule} for _ in vals[:-1]] + [{"rule": "always"}]
    ts = list(thresholds or [])
    if len(ts) == 1 and len(vals) > 2:
        ts = ts * (len(vals) - 1)
    if len(ts) != len(vals) - 1:
        raise QDeployError(f"{len(vals)} exits need {len(vals) - 1} thresholds (one per early exit: "
                           f"{', '.join(vals[:-1])}), got {len(ts)}")
    return [make_gate(rule, msm.program.value(v).dtype, threshold=float(t)) for v, t in zip(vals[:-1], ts)] + \
        [{"rule": "always"}]


def program_markdown(msm, evaluation: dict | None = None) -> str:
    """``report.md`` of a multi-stage program directory: stages (outputs, carried tensors, cost,
    estimated latency, exactness against the reference), the exits and their gates, and with
    ``evaluation`` (:func:`evaluate`) the exit distribution and accuracy."""
    from .fidelity import fidelity_sentence
    plan = msm.plan
    meta = plan.get("meta", {})
    L = [f"# qdeploy early-exit program: {meta.get('model', '?')} -> {plan.get('target', '?')}", "",
         f"- IR digest: `{meta.get('graph_digest', '')}`, {len(plan['stages'])} stages, exits "
         f"{', '.join(msm.exit_values())}",
         f"- BOPs per sample of the final exit alone (unsplit model): {meta.get('final_only_bops', 0):.4g}",
         f"- fidelity vs source (whole program): {fidelity_sentence(meta.get('fidelity') or {})}", "",
         "## Stages", "",
         "| stage | outputs | carried to later stages | BOPs | cumulative BOPs | est. latency (cycles / ns) | "
         "exactness vs reference |", "|---|---|---|---|---|---|---|"]
    for s in plan["stages"]:
        c, ex = s.get("cost", {}), s.get("exactness", {})
        lat = ("-" if c.get("latency_cycles_est") is None
               else f"{c['latency_cycles_est']} / {c.get('latency_ns_est')}")
        exs = (f"{ex.get('samples')} samples, {ex.get('mismatches')} mismatching"
               + (", bit-exact" if ex.get("bit_exact") else ", NOT bit-exact")) if ex else "-"
        L.append(f"| {s['name']} | {', '.join(s['outputs'])} | {', '.join(s.get('carried_out') or []) or '-'} | "
                 f"{c.get('bops', 0):.4g} | {c.get('cum_bops', 0):.4g} | {lat} | {exs} |")
    L += ["", "## Exits and gates", "", "| step | stage | exit value | gate |", "|---|---|---|---|"]
    for k, st in enumerate(plan["steps"]):
        L.append(f"| {k} | {st['run']} | {st['exit']['value']} | {gate_text(st['exit'].get('gate') or {'rule': 'always'})} |")
    L += ["", "Gates are decided on the stages' integer output codes (see qdeploy.runtime.multistage); "
              "stage k runs only on the inputs no earlier gate accepted."]
    if evaluation is not None:
        L += ["", render_report([dict(evaluation, label=evaluation.get("label", "golden set"))],
                                title="Evaluation").replace("# Evaluation", "## Evaluation", 1).rstrip("\n")]
    return "\n".join(L) + "\n"
