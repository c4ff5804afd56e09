"""`qdeploy search --compare` (run_search(compare=True)): the trace-only, random and uniform-at-or-above
rows in search_report.md/.json and pareto.png, checked against compare_allocations (an independent
path to the same allocations and, with the same seeds, the same fine-tuned accuracies), with the
Hessian and uniform rows unchanged by the flag; and one-line errors for bad combinations."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qdeploy.cli import app
from qdeploy.compiler.errors import QDeployError
from qdeploy.compiler.quantization.search import run_search
from qdeploy.compiler.quantization.search_compare import compare_allocations
from qdeploy.compiler.quantization.search_report import ROWS, plot_rows

from . import test_search

RECIPE = f"{test_search.__file__}:tiny_recipe"  # 64-16-10 digits MLP, 1 QAT epoch


def _no_timing(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in ("qat_seconds", "seconds", "compare")}


def test_cli_search_compare_rows_match_compare_allocations(tmp_path):
    out = tmp_path / "cmp"
    r = CliRunner().invoke(app, ["search", RECIPE, "-o", str(out), "--budget", "bops=uniform:2.5", "--bits", "2,3,4,5,6",
                                 "--qat-seeds", "2", "--workers", "1", "--no-progress", "--compare"])
    assert r.exit_code == 0, r.output
    assert "compare: hessian" in r.output
    rep = json.loads((out / "search_report.json").read_text())
    assert rep["settings"]["compare"] is True
    (b,) = rep["budgets"]
    rows = b["compare"]
    assert list(rows) == list(ROWS)
    cap = b["budget_resolved"]["bops"]
    for row in ("hessian", "trace", "random"):
        assert rows[row]["costs"]["bops"] <= cap * (1 + 1e-9)
    assert rows["uniform"]["costs"]["bops"] >= cap and rows["uniform"]["uniform_bits"] == 3
    # the comparison's uniform row (at or above the budget) is the report's uniform 3-bit row, trained once
    assert b["uniform"]["bits"] == 2 and b["uniform_above"]["bits"] == 3
    assert rows["uniform"]["tag"] == b["uniform_above"]["tag"] and rows["hessian"]["tag"] == b["hessian"]["tag"]
    assert rows["hessian"]["test_correct"] == b["hessian"]["test_correct"]
    # every distinct allocation fine-tuned once per seed, in the one fan-out
    def key(bits):  # the report's {"w", "a"} and the comparison's [w, a] forms alike
        return tuple(sorted((n, tuple(v.values()) if isinstance(v, dict) else tuple(v)) for n, v in bits.items()))
    distinct = {key(x["bits"]) for x in rows.values()} | {key(b["uniform"]["allocation"]["bits"])}
    # on this model and budget the Hessian, trace-only and random allocations all differ
    assert len({key(rows[x]["bits"]) for x in ("hessian", "trace", "random")}) == 3
    assert rep["qat_fanout"]["jobs"] == 2 * len(distinct) and rep["qat_fanout"]["failed"] == []
    # only the Hessian and uniform allocations are exported
    exported = {p.name for p in (out / "models").iterdir()}
    assert exported == {f"tiny_{x['tag']}.onnx" for x in (b["hessian"], b["uniform"], b["uniform_above"])}
    tags = {x["tag"] for x in (b["hessian"], b["uniform"], b["uniform_above"])}
    for row in ("trace", "random"):  # a QONNX only when it is an exported allocation's
        assert ("qonnx" in rows[row]) == (rows[row].get("same_as") in tags)
    md = (out / "search_report.md").read_text()
    assert "## Allocation comparison" in md and md.count("\n| bops=uniform:2.5 |") == 4
    assert "uniform 3-bit" in md and "test_acc minus uniform (2 paired se)" in md
    assert (out / "pareto.png").stat().st_size > 5000

    # an independent path: compare_allocations on the same recipe, budget and seed gives the same four
    # allocations and, fine-tuned with the same seeds, the same per-sample results
    ref = compare_allocations(RECIPE, [{"bops": "uniform:2.5"}], w_bits=(2, 3, 4, 5, 6), a_bits=None, qat_seeds=2)
    for row in ROWS:
        mine, theirs = rows[row], ref["budgets"][0]["rows"][row]
        assert mine["bits"] == theirs["bits"], row
        assert mine["test_correct"] == theirs["test_correct"] and mine["val_accs"] == theirs["val_accs"], row

    # without --compare the Hessian and uniform rows are the same numbers (same seeds), and no extra rows
    plain = run_search(RECIPE, tmp_path / "plain", budgets=[{"bops": "uniform:2.5"}], w_bits=(2, 3, 4, 5, 6), qat_seeds=2,
                       workers=1, progress=False, export=False)
    (p,) = plain["budgets"]
    assert "compare" not in p and plain["settings"]["compare"] is False
    for k in ("hessian", "uniform", "uniform_above"):
        def strip(d):  # all but timings and the export (off in the plain run)
            d = {x: y for x, y in _no_timing(d).items() if x not in ("qonnx", "ir_nodes")}
            return {**d, "allocation": _no_timing(d["allocation"])} if "allocation" in d else d
        assert strip(p[k]) == strip(b[k]), k
    assert plain["qat_fanout"]["jobs"] == 2 * 3
    assert "## Allocation comparison" not in (tmp_path / "plain" / "search_report.md").read_text()


def test_search_compare_bad_combinations(tmp_path):
    r = CliRunner().invoke(app, ["search", RECIPE, "-o", str(tmp_path / "a"), "--budget", "bops=uniform:3",
                                 "--sensitivity", "hessian", "--compare", "--no-progress"])
    assert r.exit_code == 2 and "trace-only row" in r.output and "--sensitivity" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "a").exists()
    # a budget above the widest uniform width has no uniform row to compare with: refused before the traces
    with pytest.raises(QDeployError, match=r"--compare: budget 0 .*no uniform width in \[2, 3, 4\] reaches"):
        run_search(RECIPE, tmp_path / "b", budgets=[{"bops": 1e12}], w_bits=(2, 3, 4), progress=False,
                   workers=1, compare=True)
    assert not (tmp_path / "b").exists()
    with pytest.raises(QDeployError, match="compare must be True or False"):
        run_search(RECIPE, tmp_path / "c", compare="yes", progress=False)


def test_plot_rows_draws_the_four_rows():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row = {"costs": {"bops": 1e5}, "val_acc": 0.5, "val_accs": [0.4, 0.6]}
    budgets = [{"compare": {r: {**row, "costs": {"bops": 1e5 * (1 + i)}} for i, r in enumerate(ROWS)}}]
    fig, ax = plt.subplots()
    plot_rows(ax, budgets, "val_acc", "compare")
    labels = ax.get_legend_handles_labels()[1]
    plt.close(fig)
    assert labels == ["hessian", "trace", "random", "uniform (at or above the budget)"]
