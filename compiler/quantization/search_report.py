"""The mixed-precision search report: ``search_report.md`` (:func:`render_markdown`),
``pareto.png`` (:func:`plot_pareto`) and the accuracy comparison between allocations
(:func:`accuracy_noise`, :func:`comparison_verdict`).  Both read the report dict that
:func:`.search.run_search` writes as ``search_report.json``.  The four-row comparison (Hessian,
trace-only, random, uniform) of ``run_search(compare=True)`` and of
:func:`.search_compare.compare_allocations` is rendered by one table function
(:func:`comparison_table`) and one plotting function (:func:`plot_rows`) for both.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["ROWS", "json_default", "accuracy_noise", "comparison_verdict", "comparison_table", "plot_rows",
           "render_markdown", "plot_pareto", "fanout_line", "engine_fingerprint", "set_bops_axis"]

ROWS = ("hessian", "trace", "random", "uniform")
"""The rows of the allocation comparison, in table order (:mod:`.search_compare`)."""


def json_default(o):
    """``json.dumps`` ``default=``: NumPy scalars as Python numbers, tuples as lists, else ``str(o)``."""
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def accuracy_noise(a: dict, b: dict, key: str, n: int | None = None) -> float:
    """One standard error (accuracy units) of the difference a[key] - b[key] of two allocations.

    Paired over the evaluation samples when both carry ``<split>_correct`` (per sample, the fraction
    of QAT seeds that classify it right): d_i = a_i - b_i, SE = std(d) / sqrt(n) -- the
    evaluation-set sampling noise of a paired comparison, with the seed spread folded into each
    d_i.  Otherwise the seeds' spread (std/sqrt(k) each) plus independent binomial errors
    sqrt(p(1-p)/n) (an upper bound).  0 when nothing is known.
    """
    split = key.split("_")[0]
    ca, cb = a.get(split + "_correct"), b.get(split + "_correct")
    if ca is not None and cb is not None and len(ca) == len(cb) and len(ca) > 1:
        d = np.asarray(ca, dtype=np.float64) - np.asarray(cb, dtype=np.float64)
        return float(d.std(ddof=1) / math.sqrt(len(d)))
    v = 0.0
    for r in (a, b):
        accs = r.get(key + "s") or []
        if len(accs) > 1:
            v += float(np.var(accs, ddof=1)) / len(accs)
        if n:
            p_ = r[key]
            v += p_ * (1 - p_) / n
    return math.sqrt(v)


def comparison_verdict(h, u, key, n) -> str:
    """One phrase comparing allocation ``h`` (Hessian) with ``u`` (uniform) on accuracy ``key``:
    which is better, the difference in points and whether it lies within twice its standard
    error (:func:`accuracy_noise` over ``n`` evaluation samples)."""
    d = h[key] - u[key]
    se = accuracy_noise(h, u, key, n)
    tag = "Hessian >= uniform" if d >= 0 else "uniform better"
    if se > 0:
        tag += f" ({d * 100:+.2f} points, {'within' if abs(d) <= 2 * se else 'beyond'} 2 standard errors = {2 * se * 100:.2f})"
    return tag


def _acc(r, key):
    return "n/a" if r is None or key not in r else f"{r[key]:.4f}"


def comparison_table(budgets, key: str = "test_acc", rows_key: str = "rows", acc_keys=None) -> str:
    """Markdown table of the four-row allocation comparison.

    Args:
        budgets: list of ``{"budget": {kind: value}, rows_key: {row: row dict}}`` with the rows of
            :data:`ROWS`, each holding ``costs`` (``bops``), the accuracies and ``<split>_correct``
            (``uniform`` also ``uniform_bits``): :func:`.search_compare.compare_allocations`'s
            ``budgets`` (``rows_key="rows"``) or ``search_report.json``'s (``rows_key="compare"``).
        key: the accuracy compared, ``"test_acc"`` or ``"val_acc"``.
        acc_keys: accuracy columns shown (default ``[key]``).

    Returns:
        per budget and row: BOPs, the accuracies (means over QAT seeds), and each allocation's
        difference to the uniform row in points with twice its paired standard error
        (:func:`accuracy_noise`), marked ``*`` beyond it; a row fine-tuned as another row's
        allocation says which.
    """
    acc_keys = list(acc_keys or [key])
    lines = ["| budget | row | BOPs | " + " | ".join(acc_keys) + f" | {key} minus uniform (2 paired se) |",
             "|---|---|---:|" + "---:|" * len(acc_keys) + "---|"]
    for b in budgets:
        rows = b[rows_key]
        u = rows["uniform"]
        bud = ", ".join(f"{k}={v}" for k, v in b["budget"].items())
        for row in ROWS:
            r = rows[row]
            tag = f"uniform {r['uniform_bits']}-bit" if row == "uniform" else row
            tag += f" (same as {r['same_as']})" if r.get("same_as") else ""
            diff = ""
            if row != "uniform" and key in r and key in u:
                d, se = r[key] - u[key], accuracy_noise(r, u, key)
                diff = f"{d * 100:+.2f} ({2 * se * 100:.2f}){' *' if abs(d) > 2 * se else ''}"
            lines.append(f"| {bud} | {tag} | {r['costs']['bops']:.4g} | " + " | ".join(_acc(r, k) for k in acc_keys)
                         + f" | {diff} |")
    lines += ["", "`*`: the difference exceeds 2 paired standard errors (over the evaluation samples)."]
    return "\n".join(lines) + "\n"


def plot_rows(ax, budgets, key: str = "test_acc", rows_key: str = "rows") -> None:
    """Plot on matplotlib axes ``ax`` accuracy ``key`` vs BOPs of each row of :data:`ROWS` over the
    budgets (same ``budgets`` / ``rows_key`` as :func:`comparison_table`); error bars: one standard
    deviation over the QAT seeds (``<key>s``)."""
    for row, style in zip(ROWS, ("o-", "^-", "x:", "s--")):
        pts = sorted({(b[rows_key][row]["costs"]["bops"], b[rows_key][row][key],
                       float(np.std(b[rows_key][row].get(key + "s") or [0.0])))
                      for b in budgets if key in b[rows_key][row]})
        if pts:
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, fmt=style, ms=4, capsize=2,
                        label=f"{row} (at or above the budget)" if row == "uniform" else row)


def fanout_line(fo: dict | None) -> str:
    """One Markdown line: how the QAT jobs ran (engine, workers, retried and failed jobs)."""
    if not fo:
        return "- QAT jobs: not recorded"
    where = f", Ray at {fo['ray_address']}" if fo.get("ray_address") else ""
    line = (f"- QAT jobs: {fo['jobs']} (allocation x seed) on the {fo['engine']} engine, {fo['workers']} "
            f"worker(s){where}, {fo['seconds']:.1f} s")
    if fo.get("retried"):
        line += "; retried once: " + "; ".join(f"{r['job']} ({r['reason']})" for r in fo["retried"])
    return line


def render_markdown(rep: dict) -> str:
    """``search_report.md``: settings, per-layer table, Hessian vs uniform per budget, the four-row
    comparison (:func:`comparison_table`) when the report has it, frontier."""
    acc_key = "test_acc" if "test" in rep["float_accuracy"] else "val_acc"
    L = [f"# qdeploy search report: {rep['model']}", "",
         "- float accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in rep["float_accuracy"].items()),
         f"- candidate weight bits {rep['settings']['w_bits']}, activation bits {rep['settings']['a_bits']}, "
         f"input {rep['settings']['input']}",
         ("- Hessian traces: exact (Gauss-Newton block = Hessian block of a piecewise-linear network, "
          "no probes; standard error 0), " if rep['trace'].get('method') == "ggn_exact" else
          (f"- Hutchinson, per-sample probes: {rep['trace']['probes']} passes (one Rademacher probe per sample each; "
           if rep['trace'].get('estimator') == "per_sample" else f"- Hutchinson: {rep['trace']['probes']} Rademacher probes (")
          + f"cap {rep['settings']['probes_cap']}, "
          f"tol {rep['settings']['tol']}, converged: {rep['trace']['converged']}), ")
         + f"{rep['settings']['trace_samples']} samples, {rep['trace']['seconds']:.2f} s",
         f"- QAT: {rep['settings']['qat']}, seed {rep['seed']}; the whole search took {rep['seconds']:.1f} s",
         fanout_line(rep.get("qat_fanout")), "",
         "## Layers", "",
         "Trace = Tr(H) of the loss w.r.t. the layer's weights (± standard error); act trace = w.r.t. its input "
         "activation (all samples). Chosen bits per budget as w/a.", "",
         "| layer | kind | weights | trace | ± se | Tr/n | act trace | ± se | " +
         " | ".join(f"budget {i}" for i in range(len(rep["budgets"]))) + " |",
         "|---|---|---|---|---|---|---|---|" + "---|" * len(rep["budgets"])]
    for li, r in enumerate(rep["layers"]):
        L.append(f"| {r['name']} | {r['kind']} | {r['n_weights']} | {r['trace']:.4g} | {r['stderr']:.2g} | "
                 f"{r['mean_trace']:.3g} | "
                 + (f"{r['act_trace']:.4g} | {r['act_stderr']:.2g} | " if "act_trace" in r
                    else "- (model input) | - | " if li == 0 else "- (not searched) | - | ")
                 + " | ".join(f"{c[0]}/{c[1]}" for c in r["chosen"]) + " |")
    mode = rep["settings"].get("sensitivity_mode", "hessian")
    L += ["", "## Sensitivity per bit width", "",
          f"Mode `{mode}`. Omega = Tr(H)/n * ||Q_b(T) - T||^2 (HAWQ-V3 Eq. 10; ~2x the loss increase under the "
          "quadratic model); 2 dL = twice the measured loss increase of quantizing that tensor alone. "
          + ("The ILP minimizes max(Omega, 2 dL): where 2 dL > Omega the second-order model under-estimates "
             "(marked *)." if mode == "hessian+measured" else
             "The ILP minimizes 2 dL." if mode == "measured" else "The ILP minimizes Omega."), ""]
    wb = rep["settings"]["w_bits"]
    L += ["| tensor | " + " | ".join(f"{b} bits" for b in wb) + " |", "|---|" + "---|" * len(wb)]
    for r in rep["layers"]:
        sd = r.get("sensitivity") or {}
        for t, om_k, ml_k in (("W", "omega_w", "measured_w"), ("act", "omega_a", "measured_a")):
            om, ml = sd.get(om_k), sd.get(ml_k)
            if not om:
                continue
            cells = []
            for b in wb:
                o = om.get(str(b))
                if o is None:
                    cells.append("")
                    continue
                if ml is None:
                    cells.append(f"{o:.2g}")
                else:
                    m2 = 2 * ml[str(b)]
                    cells.append(f"{o:.2g} / {m2:.2g}" + ("*" if m2 > o else ""))
            L.append(f"| {r['name']} {t} | " + " | ".join(cells) + " |")
    L += ["", "## Hessian allocation vs uniform precision, per budget", "",
          f"Accuracies are means over the {rep['settings'].get('qat_seeds', 1)} QAT seed(s). BOPs here are dense "
          "(MACs x (w a + w + a + log2 fan-in) for w-bit weights and a-bit inputs, as the ILP budgets them); `qdeploy compile` reports BOPs "
          "after the trained zero weights are removed (the pruned fraction f_p of arXiv 2103.05579 Eq. 1), "
          "so its figure for the same QONNX model is lower. 'weight bits' = total weight storage in bits."]
    if any(k not in ("bops", "size") for b in rep["budgets"] for k in b["budget_resolved"]):
        L += ["", "FPGA budgets (LUT, FF, DSP, BRAM, latency) are estimator figures for the *float* model's weights "
              "quantized to each width before QAT (the ILP needs them before training): the Dense/Conv rows per "
              "layer plus the ReLU / requantization / pooling rows between two layers; before QAT they equal "
              "`qdeploy estimate` on the exported model. QAT moves the weights: when a layer's max |w| falls "
              "below a power of two its scale halves and its LUTs roughly double (seen on the digits models' first "
              "layers), so check the chosen model with `qdeploy estimate`."]
    L += ["",
          "| budget | allocation | BOPs | weight bits | sensitivity | val acc | test acc | QONNX |",
          "|---|---|---|---|---|---|---|---|"]
    for i, b in enumerate(rep["budgets"]):
        h, u = b["hessian"], b["uniform"]
        bud = ", ".join(f"{k}={v}" for k, v in b["budget"].items())
        hwk = [k for k in b["budget_resolved"] if k not in ("bops", "size")]
        hwc = lambda c: "".join(f" ({k} {c[k]:.4g})" for k in hwk if k in c)  # estimator budgets, e.g. lut
        L.append(f"| {i}: {bud} | Hessian ILP{hwc(h['costs'])} | {h['costs']['bops']:.4g} | {h['costs']['size']:.0f} | "
                 f"{h['objective']:.3g} | {_acc(h, 'val_acc')} | {_acc(h, 'test_acc')} | {h.get('qonnx', '')} |")
        if u:
            ua = u["allocation"]
            L.append(f"| {i} | uniform {u['bits']}-bit{hwc(ua['costs'])} | {ua['costs']['bops']:.4g} | {ua['costs']['size']:.0f} | "
                     f"{ua['objective']:.3g} | {_acc(u, 'val_acc')} | {_acc(u, 'test_acc')} | {u.get('qonnx', '')} |")
        else:
            L.append(f"| {i} | uniform: none fits | | | | | | |")
        ua2 = b.get("uniform_above")
        if ua2:
            c = ua2["allocation"]["costs"]
            L.append(f"| {i} | uniform {ua2['bits']}-bit (above budget){hwc(c)} | {c['bops']:.4g} | {c['size']:.0f} | "
                     f"{ua2['allocation']['objective']:.3g} | {_acc(ua2, 'val_acc')} | {_acc(ua2, 'test_acc')} | "
                     f"{ua2.get('qonnx', '')} |")
    n_ev = (rep.get("n_eval") or {}).get(acc_key.split("_")[0])
    L += ["", f"Comparison ({acc_key}, mean of the QAT seeds; difference in points with twice its paired "
              f"standard error over the {n_ev or '?'} evaluation samples):", ""]
    for i, b in enumerate(rep["budgets"]):
        h, u = b["hessian"], b["uniform"]
        if u:
            L.append(f"- budget {i}: Hessian {h[acc_key]:.4f} at {h['costs']['bops']:.4g} BOPs vs uniform "
                     f"{u['bits']}-bit {u[acc_key]:.4f} at {u['allocation']['costs']['bops']:.4g} BOPs: "
                     f"{comparison_verdict(h, u, acc_key, n_ev)}")
        ua2 = b.get("uniform_above")
        if ua2:
            L.append(f"  - vs uniform {ua2['bits']}-bit {ua2[acc_key]:.4f} at {ua2['allocation']['costs']['bops']:.4g} "
                     f"BOPs (more than the budget): {comparison_verdict(h, ua2, acc_key, n_ev)}")
    if any("compare" in b for b in rep["budgets"]):
        L += ["", "## Allocation comparison: Hessian vs trace-only vs random vs uniform", "",
              "Per budget, each fine-tuned with the same QAT settings and seeds: `hessian` (the allocation above), "
              "`trace` (the ILP on HAWQ-V3's Omega alone, without the measured term), `random` (the ILP on random "
              "sensitivities c 4^-b, seed `seed * 1000 + budget`), `uniform` (the narrowest uniform width at or "
              "above the budget). Only the Hessian and uniform allocations above are exported.", "",
              comparison_table(rep["budgets"], acc_key, "compare",
                               ["val_acc", "test_acc"] if acc_key == "test_acc" else ["val_acc"]).rstrip()]
    for kind, pts in rep["frontier"].items():
        L += ["", f"## Frontier: total sensitivity vs {kind} (ILP sweep, no QAT)", "", f"| {kind} | sensitivity |", "|---|---|"]
        L += [f"| {p['cost']:.4g} | {p['objective']:.4g} |" for p in pts]
    return "\n".join(L) + "\n"


def plot_pareto(rep: dict, path) -> Path:
    """``pareto.png``: sensitivity frontier vs BOPs (left) and accuracy after QAT vs BOPs (right): the
    Hessian and uniform allocations, or with the comparison rows (``run_search(compare=True)``) the
    four rows of :func:`plot_rows`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc_key = "test_acc" if "test" in rep["float_accuracy"] else "val_acc"
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    fr = rep["frontier"].get("bops", [])
    ax[0].plot([p["bops"] for p in fr], [p["objective"] for p in fr], "o-", ms=3, label="ILP frontier")
    up = rep["uniform_points"]
    ax[0].plot([p["bops"] for p in up], [p["objective"] for p in up], "s--", label="uniform")
    for p in up:
        ax[0].annotate(str(p["bits"]), (p["bops"], p["objective"]), fontsize=7)
    ax[0].set(yscale="log", xlabel="BOPs / sample", ylabel="total sensitivity Σ Ω",
              title=f"{rep['model']}: sensitivity frontier")
    ax[0].legend()
    if all("compare" in b for b in rep["budgets"]):  # the four rows of the comparison
        plot_rows(ax[1], rep["budgets"], acc_key, "compare")
    else:
        hb = [(b["hessian"]["costs"]["bops"], b["hessian"][acc_key]) for b in rep["budgets"]]
        ub = [(b["uniform"]["allocation"]["costs"]["bops"], b["uniform"][acc_key])
              for b in rep["budgets"] if b["uniform"]]
        ax[1].plot(*zip(*sorted(hb)), "o-", label="Hessian ILP + QAT")
        if ub:
            ax[1].plot(*zip(*sorted(set(ub))), "s--", label="uniform + QAT")
    ax[1].axhline(rep["float_accuracy"].get(acc_key.replace("_acc", ""), np.nan), color="gray", lw=0.8, label="float")
    ax[1].set(xlabel="BOPs / sample", ylabel=acc_key.replace("_", " "), title="accuracy after QAT")
    for a in ax:
        set_bops_axis(a)
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def engine_fingerprint(out_dir, rep: dict) -> list[tuple]:
    """What a search report must not owe to the engine that ran its QAT jobs (serial, local workers
    or Ray): per budget and Hessian / uniform / uniform-above row, the allocation, the per-seed
    accuracies, the per-sample correctness and the SHA-256 of the exported QONNX file (in
    ``out_dir``).  Two runs of one search are the same exactly when these lists are equal."""
    import hashlib
    import json
    from pathlib import Path

    rows = []
    for b in rep["budgets"]:
        for key in ("hessian", "uniform", "uniform_above"):
            r = b[key]
            if r is None:
                continue
            rows.append((key, json.dumps(r["bits"] if key == "hessian" else r["allocation"]["bits"], sort_keys=True),
                         r["val_accs"], r.get("test_accs"), r["val_correct"], r.get("test_correct"),
                         hashlib.sha256((Path(out_dir) / r["qonnx"]).read_bytes()).hexdigest()))
    return rows


def set_bops_axis(ax) -> None:
    """A readable BOPs axis for ``ax`` (after plotting): logarithmic when the plotted x values span
    a factor of 10 or more, else linear (a log axis within one decade labels its minor ticks,
    2x10^6, 3x10^6..., which overlap)."""
    lo, hi = ax.dataLim.intervalx  # the data's x range (an axhline does not extend it)
    ax.set_xscale("log" if lo > 0 and hi / lo >= 10 else "linear")
