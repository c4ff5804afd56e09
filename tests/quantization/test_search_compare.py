"""The allocation ablation (compiler/quantization/search_compare.py) on a tiny MNIST-1D MLP: four rows
per budget under the budget (or, for uniform, at or above it), seeded random allocations, and the
markdown table."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from qdeploy.compiler.errors import QDeployError
from qdeploy.compiler.quantization import ilp
from qdeploy.compiler.quantization.search_compare import (ROWS, compare_allocations, random_sensitivities,
                                                          render_comparison, uniform_at_or_above)

RECIPE_PY = Path(__file__).resolve().parents[2] / "examples" / "mnist1d" / "search_recipe.py"


def tiny_mlp_recipe():
    spec = importlib.util.spec_from_file_location("mnist1d_recipe_example_c", RECIPE_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.recipe_mlp(width=12, epochs=5, qat_epochs=1, n_train=400, n_test=300)


def _specs():
    return [ilp.LayerSpec("a", 40, 12, n_weights=480, w_bits=(2, 4, 8), fixed_a_bits=8),
            ilp.LayerSpec("b", 12, 10, n_weights=120, w_bits=(2, 4, 8), a_bits=(2, 4, 8))]


def test_random_sensitivities_are_seeded_and_decrease_with_bits():
    s1, s2, s3 = random_sensitivities(_specs(), 1), random_sensitivities(_specs(), 1), random_sensitivities(_specs(), 2)
    assert s1 == s2 and s1 != s3
    for name, d in s1.items():
        assert all(v > 0 for v in d.values())
        assert d[(2, 8 if name == "a" else 2)] > d[(4, 8 if name == "a" else 2)] > d[(8, 8 if name == "a" else 2)]


def test_uniform_at_or_above_picks_the_narrowest_width_reaching_the_budget():
    specs = _specs()
    c4 = ilp.total_cost("bops", specs, ilp.uniform_allocation(specs, 4).bits)
    assert uniform_at_or_above(specs, (2, 4, 8), {"bops": c4})[0] == 4
    assert uniform_at_or_above(specs, (2, 4, 8), {"bops": c4 * 1.01})[0] == 8
    with pytest.raises(QDeployError, match="no uniform width"):
        uniform_at_or_above(specs, (2, 4, 8), {"bops": c4 * 100})


def test_compare_allocations_tiny_mnist1d_mlp():
    rep = compare_allocations(tiny_mlp_recipe, [{"bops": "uniform:2.5"}], w_bits=(2, 3, 4), a_bits=(2, 3, 4),
                              qat_seeds=2, probes=10)
    assert rep["model"] == "mnist1d_mlp" and rep["n_eval"] == {"val": 500, "test": 300}
    (b,) = rep["budgets"]
    assert set(b["rows"]) == set(ROWS)
    cap = b["budget_resolved"]["bops"]
    for row in ("hessian", "trace", "random"):
        assert b["rows"][row]["costs"]["bops"] <= cap * (1 + 1e-9)
    assert b["rows"]["uniform"]["uniform_bits"] == 3 and b["rows"]["uniform"]["costs"]["bops"] >= cap
    for r in b["rows"].values():
        assert len(r["test_accs"]) == 2 and len(r["test_correct"]) == 300
        assert abs(np.mean(r["test_correct"]) - r["test_acc"]) < 1e-3  # per-sample fractions average to the accuracy
        assert r["bits"]["0"][1] == 8  # the first layer reads the 8-bit model input
    # every distinct allocation fine-tuned once per seed, as fan-out jobs (here in this process)
    distinct = {tuple(sorted((n, tuple(v)) for n, v in r["bits"].items())) for r in b["rows"].values()}
    fo = rep["qat_fanout"]
    assert fo["engine"] == "serial" and fo["jobs"] == 2 * len(distinct) and fo["failed"] == []
    assert all(("same_as" in r) == (r["tag"] != f"b0_{row}") for row, r in b["rows"].items())
    md = render_comparison(rep)
    assert md.count("\n| bops=uniform:2.5 |") == 4 and "uniform 3-bit" in md


def test_plot_comparison_writes_a_png(tmp_path):
    from qdeploy.compiler.quantization.search_compare import plot_comparison
    row = {"costs": {"bops": 1e5}, "test_acc": 0.5, "test_accs": [0.4, 0.6]}
    rep = {"model": "m", "float_accuracy": {"test": 0.9},
           "budgets": [{"rows": {r: {**row, "costs": {"bops": 1e5 * (1 + i)}} for i, r in enumerate(ROWS)}}]}
    p = plot_comparison(rep, tmp_path / "c.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


@pytest.mark.slow
def test_compare_allocations_on_two_workers_identical_to_serial():
    kw = dict(w_bits=(2, 3, 4), a_bits=(2, 3, 4), qat_seeds=2, probes=10)
    r1 = compare_allocations(tiny_mlp_recipe, [{"bops": "uniform:2.5"}], workers=1, **kw)
    r2 = compare_allocations(tiny_mlp_recipe, [{"bops": "uniform:2.5"}], workers=2, **kw)
    assert r1["qat_fanout"]["engine"] == "serial" and r2["qat_fanout"]["engine"] == "local"

    def rows(rep):  # everything but the timings
        return [{row: {k: v for k, v in r.items() if k != "qat_seconds"} for row, r in b["rows"].items()}
                for b in rep["budgets"]]
    assert rows(r2) == rows(r1)
