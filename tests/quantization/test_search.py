"""End to end: `qdeploy search` on a tiny digits MLP (few probes, one QAT epoch), report files, QONNX
that `qdeploy compile` takes, and one-line errors for bad settings."""
import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import qdeploy
from qdeploy.cli import app
from qdeploy.compiler.errors import QDeployError


def tiny_recipe():
    """Float 64-16-10 MLP on 400 digits, trained briefly."""
    from sklearn.datasets import load_digits
    from qdeploy.compiler.quantization import qat

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 10))
    qat.fine_tune(m, x[:300], y[:300], epochs=5, lr=1e-2)
    return {"name": "tiny", "model": m, "train": (x[:300], y[:300]), "val": (x[300:400], y[300:400]),
            "test": (x[400:500], y[400:500]), "input": {"bits": 5, "scale": 2.0 ** -4},
            "qat": {"epochs": 1, "lr": 3e-3}}


def test_cli_search_end_to_end(tmp_path):
    out = tmp_path / "s"
    r = CliRunner().invoke(app, ["search", f"{__file__}:tiny_recipe", "-o", str(out),
                                 "--budget", "bops=uniform:4", "--budget", "size=uniform:3,bops=uniform:6",
                                 "--probes", "10", "--bits", "3,4,6", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "Hessian" in r.output and "uniform" in r.output
    rep = json.loads((out / "search_report.json").read_text())
    assert (out / "search_report.md").read_text().startswith("# qdeploy search report: tiny")
    assert (out / "pareto.png").stat().st_size > 1000
    assert len(rep["budgets"]) == 2
    # the tiny ReLU MLP qualifies for exact Gauss-Newton traces: no probes, zero standard error
    assert rep["trace"]["method"] == "ggn_exact"
    assert "Hessian traces: exact" in (out / "search_report.md").read_text()
    for layer in rep["layers"]:
        assert layer["probes"] == 0 and layer["stderr"] == 0 and layer["trace"] > 0 and layer["n_weights"] > 0
        assert len(layer["chosen"]) == 2
    b0 = rep["budgets"][0]
    assert b0["hessian"]["costs"]["bops"] <= b0["budget_resolved"]["bops"] * (1 + 1e-9)
    assert b0["uniform"]["bits"] == 4  # the uniform allocation defining the budget fits it exactly
    b1 = rep["budgets"][1]
    assert b1["hessian"]["costs"]["size"] <= b1["budget_resolved"]["size"] * (1 + 1e-9)
    assert rep["frontier"]["bops"]
    # the chosen model is QONNX that the compiler takes, and it runs on the reference target
    onnx_path = out / b0["hessian"]["qonnx"]
    res = qdeploy.compile(str(onnx_path), target="reference", out_dir=tmp_path / "c")
    assert res.report["exactness"]["bit_exact"]
    # a second search into the same folder needs --force, and then replaces it whole
    again = ["search", f"{__file__}:tiny_recipe", "-o", str(out), "--budget", "bops=uniform:6", "--probes", "10",
             "--bits", "3,4,6", "--no-progress"]
    r = CliRunner().invoke(app, again)
    assert r.exit_code == 2 and "holds an earlier search" in r.output and onnx_path.exists()
    r = CliRunner().invoke(app, again + ["--force"])
    assert r.exit_code == 0, r.output
    assert len(json.loads((out / "search_report.json").read_text())["budgets"]) == 1
    assert not list((out / "models").glob("*_b1_*"))  # no stale models of the first run (it had 2 budgets)


def test_cli_search_bad_settings(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["search", f"{__file__}:tiny_recipe", "-o", str(tmp_path / "a"),
                            "--budget", "bops=10", "--probes", "2", "--no-progress"])
    assert r.exit_code == 2 and "below the cost of the all-minimum-bits allocation" in r.output
    r = runner.invoke(app, ["search", f"{__file__}:tiny_recipe", "-o", str(tmp_path / "b"),
                            "--budget", "bops=uniform:4", "--tie", "0,1", "--no-progress"])
    assert r.exit_code == 2 and "has no weights" in r.output
    r = runner.invoke(app, ["search", f"{__file__}:tiny_recipe", "-o", str(tmp_path / "c"),
                            "--budget", "bops=uniform:4", "--bits", ",", "--no-progress"])
    assert r.exit_code == 2 and "empty" in r.output
    r = runner.invoke(app, ["search", "no_such_module:f", "-o", str(tmp_path / "d"), "--budget", "bops=1"])
    assert r.exit_code == 2 and "cannot load recipe" in r.output
    r = runner.invoke(app, ["search", f"{__file__}:tiny_recipe", "-o", str(tmp_path / "e"),
                            "--budget", "foo=3", "--no-progress"])
    assert r.exit_code == 2 and "unknown budget 'foo'" in r.output and "lut" in r.output
    r = runner.invoke(app, ["search", f"{__file__}:tiny_recipe", "-o", str(tmp_path / "f"),
                            "--budget", "bops=uniform:99", "--no-progress"])
    assert r.exit_code == 2 and "within the candidate bit widths 2..8" in r.output
    # a failed search leaves no output directory behind (the all-minimum check fails after the traces)
    assert not any((tmp_path / d).exists() for d in "abcdef"), sorted(x.name for x in tmp_path.iterdir())
    # an existing folder that is not a search output is refused and left untouched
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "important.txt").write_text("keep")
    r = runner.invoke(app, ["search", f"{__file__}:tiny_recipe", "-o", str(mine),
                            "--budget", "bops=uniform:4", "--no-progress"])
    assert r.exit_code == 2 and "not a qdeploy search output" in r.output
    assert [x.name for x in mine.iterdir()] == ["important.txt"]
    for bad, msg in ((["--qat-seeds", "0"], "qat_seeds must be >= 1"), (["--qat-epochs", "-1"], "qat_epochs must be >= 0")):
        r = runner.invoke(app, ["search", f"{__file__}:tiny_recipe", "-o", str(tmp_path / "g"),
                                "--budget", "bops=uniform:4", "--no-progress", *bad])
        assert r.exit_code == 2 and msg in r.output and not (tmp_path / "g").exists()


def test_cli_search_lut_budget(tmp_path):
    """--budget lut=... through the hls4ml estimator (weights-only, 6-bit activations, fractional uniform)."""
    out = tmp_path / "l"
    r = CliRunner().invoke(app, ["search", f"{__file__}:tiny_recipe", "-o", str(out), "--budget", "lut=uniform:3.5",
                                 "--bits", "3,4", "--act-bits", "fixed:6", "--probes", "10", "--part", "zcu102",
                                 "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "lut" in r.output
    rep = json.loads((out / "search_report.json").read_text())
    b = rep["budgets"][0]
    assert b["hessian"]["costs"]["lut"] <= b["budget_resolved"]["lut"] * (1 + 1e-9)
    assert b["uniform"]["bits"] == 3 and b["uniform"]["allocation"]["costs"]["lut"] < b["budget_resolved"]["lut"]
    assert all(v["a"] == 6 for k, v in b["hessian"]["bits"].items() if k != "0")
    assert rep["settings"]["estimator"]["part"] == "zcu102" and rep["settings"]["act_bits_fixed"] == 6


def tiny_recipe_qat(**qat_cfg):
    r = tiny_recipe()
    r["qat"] = {**r["qat"], **qat_cfg}
    return r


def test_search_distillation_setting_and_bad_qat_keys(tmp_path):
    from qdeploy.compiler.quantization.search import run_search
    common = dict(budgets=[{"bops": "uniform:4"}], probes=2, progress=False, export=False)
    rep = run_search(lambda: tiny_recipe_qat(distill_alpha=0.5, distill_temperature=3.0), tmp_path / "kd", **common)
    assert rep["settings"]["qat"]["distill_alpha"] == 0.5 and rep["settings"]["qat"]["distill_temperature"] == 3.0
    assert 0.0 < rep["budgets"][0]["hessian"]["val_acc"] <= 1.0
    for cfg, msg in (({"distill": 0.5}, "unknown key"), ({"distill_alpha": 2.0}, "distill_alpha must be in"),
                     ({"distill_temperature": 0}, "distill_temperature > 0")):
        with pytest.raises(QDeployError, match=msg):
            run_search(lambda cfg=cfg: tiny_recipe_qat(**cfg), tmp_path / "bad", **common)
        assert not (tmp_path / "bad").exists()


def _bad_recipe(kind):
    r = tiny_recipe()
    if kind == "none":
        return None
    if kind == "unknown_key":
        r["vall"] = r["val"]
    elif kind == "lr":
        r["qat"]["lr"] = "fast"
    elif kind == "lr_neg":
        r["qat"]["lr"] = -1
    elif kind == "batch0":
        r["qat"]["batch_size"] = 0
    elif kind == "qat_list":
        r["qat"] = [1, 2]
    elif kind == "labels":
        r["train"] = (r["train"][0], r["train"][1][:-5])
    elif kind == "val_shape":
        r["val"] = (r["val"][0][:, :32], r["val"][1])
    return r


def test_search_bad_recipes_budgets_and_output_folders(tmp_path):
    """Bad recipe results, budgets and bit options give one-line QDeployErrors before any training;
    a failed run (even with force) leaves an earlier search and an empty target folder as they were."""
    from qdeploy.compiler.quantization.search import run_search
    from qdeploy.compiler.quantization.search_budget import parse_search_budget
    from qdeploy.compiler.quantization.search_recipe import load_recipe
    common = dict(budgets=[{"bops": "uniform:4"}], probes=2, progress=False, export=False)
    for kind, msg in (("none", "returned NoneType"), ("unknown_key", "unknown key"), ("lr", "lr must be a number"),
                      ("lr_neg", "lr must be > 0"), ("batch0", "batch_size must be >= 1"),
                      ("qat_list", "'qat' must be a mapping"), ("labels", "same N"),
                      ("val_shape", "'val' inputs of shape")):
        with pytest.raises(QDeployError, match=msg):
            run_search(lambda kind=kind: _bad_recipe(kind), tmp_path / "bad", **common)
        assert not (tmp_path / "bad").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")], "staging folder left behind"
    for text, msg in (("bops=1e5,bops=2e5", "twice"), ("bops=inf", "finite"), ("bops=nan", "finite")):
        with pytest.raises(QDeployError, match=msg):
            parse_search_budget(text)
    with pytest.raises(QDeployError, match="not a number"):
        run_search(tiny_recipe, tmp_path / "bad", **{**common, "budgets": [{"bops": "abc"}]})
    for kw, msg in (({"probes": 0}, "probes must be >= 1"), ({"tol": float("nan")}, "tol must be a positive")):
        with pytest.raises(QDeployError, match=msg):
            run_search(tiny_recipe, tmp_path / "bad", **{**common, **kw})
    # a failed run into a new nested path leaves none of the folders it created
    with pytest.raises(QDeployError, match="below the cost"):
        run_search(tiny_recipe, tmp_path / "new" / "deep" / "x", **{**common, "budgets": [{"bops": 10.0}]})
    assert not (tmp_path / "new").exists()
    with pytest.raises(QDeployError, match="act_bits_fixed"):
        run_search(tiny_recipe, tmp_path / "bad", **{**common, "a_bits": (), "act_bits_fixed": 0})
    # an earlier search survives a failing --force run; it is replaced only by a finished one
    good = tmp_path / "good"
    run_search(tiny_recipe, good, **common)
    before = (good / "search_report.json").read_text()
    with pytest.raises(QDeployError, match="below the cost"):
        run_search(tiny_recipe, good, **{**common, "budgets": [{"bops": 10.0}], "force": True})
    assert (good / "search_report.json").read_text() == before
    run_search(tiny_recipe, good, **{**common, "force": True, "seed": 1})
    assert json.loads((good / "search_report.json").read_text())["seed"] == 1
    # an existing empty folder stays usable after a failure, and is filled by a finished search
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QDeployError):
        run_search(lambda: _bad_recipe("batch0"), empty, **common)
    assert empty.is_dir() and not any(empty.iterdir())
    run_search(tiny_recipe, empty, **common)
    assert (empty / "search_report.json").is_file()
    # YAML recipes: args go to the function, anything else is refused; a missing file says so
    y = tmp_path / "r.yaml"
    y.write_text(f"recipe: {__file__}:tiny_recipe_qat\nargs:\n  epochs: 2\n")
    fn, args = load_recipe(str(y))
    assert args == {"epochs": 2} and fn(**args)["qat"]["epochs"] == 2
    rep = run_search(str(y), tmp_path / "yaml_run", **common)
    assert rep["settings"]["recipe"] == str(y) and rep["settings"]["recipe_args"] == {"epochs": 2}
    y.write_text(f"recipe: {__file__}:tiny_recipe\nqat_seeds: 1\n")
    with pytest.raises(QDeployError, match="unknown key"):
        load_recipe(str(y))
    with pytest.raises(QDeployError, match="not found"):
        load_recipe(str(tmp_path / "none.yaml"))
    y.write_text(f"recipe: {y}\n")
    with pytest.raises(QDeployError, match="not another YAML file"):
        load_recipe(str(y))
    with pytest.raises(QDeployError, match="has no function"):
        load_recipe(f"{__file__}:nope")


def test_cli_search_bit_option_errors(tmp_path):
    runner = CliRunner()
    for opts, msg in ((["--act-bits", "fixed:0"], "fixed:B needs an integer B in 2..32"),
                      (["--act-bits", "fixed:99"], "fixed:B needs an integer B in 2..32"),
                      (["--act-bits", "fixedx"], "expected 'fixed'"),
                      (["--bits", "2,x"], "--bits '2,x': expected comma-separated integers"),
                      (["--act-bits", "2.5,4"], "--act-bits '2.5,4'"),
                      (["--act-bits", ","], "list of candidate bit widths is empty")):
        r = runner.invoke(app, ["search", f"{__file__}:tiny_recipe", "-o", str(tmp_path / "o"),
                                "--budget", "bops=uniform:4", "--no-progress", *opts])
        assert r.exit_code == 2 and msg in r.output, (opts, r.output)
        assert not (tmp_path / "o").exists()
