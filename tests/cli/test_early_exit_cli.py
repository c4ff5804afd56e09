"""`qdeploy compile-early-exit` and `qdeploy run` on a multi-stage program (reference target)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

pytest.importorskip("brevitas")


@pytest.fixture(scope="module")
def branchy(tmp_path_factory):
    from qdeploy.compiler.frontends.early_exit import export_early_exit
    from qdeploy.compiler.quantization.branchy import train_joint
    spec = importlib.util.spec_from_file_location("ee_model_cli", REPO / "examples" / "early_exit" / "model.py")
    M = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(M)
    x_tr, y_tr, x_te, y_te = M.load_data(images=True)
    net = M.make_branchy_cnn(channels=(4, 8, 16))
    train_joint(net, (x_tr[:400], y_tr[:400]), epochs=2)
    d = tmp_path_factory.mktemp("eecli")
    path = export_early_exit(net, x_te[:1], d / "branchy.onnx")
    np.save(d / "x.npy", x_te[:64].astype(np.float32))
    np.save(d / "y.npy", np.asarray(y_te[:64]))
    return d, path


def test_compile_early_exit_and_run(branchy):
    from typer.testing import CliRunner

    from qdeploy.cli import app
    from qdeploy.early_exit import exit_codes
    from qdeploy.runtime.multistage import MultiStageModel
    d, path = branchy
    out = d / "prog"
    r = CliRunner().invoke(app, ["compile-early-exit", str(path), "-t", "reference", "-o", str(out),
                                 "--exits", "exit_pool1,exit_pool2,exit_final", "--gate", "max_softmax",
                                 "--thresholds", "0.6,0.8", "--golden", str(d / "x.npy"), "--labels", str(d / "y.npy")])
    assert r.exit_code == 0, r.output
    assert "3 stages" in r.output and "max_softmax>=" in r.output and "golden set: accuracy" in r.output
    plan = json.loads((out / "plan.json").read_text())
    assert [st["exit"]["value"] for st in plan["steps"]] == ["exit_pool1", "exit_pool2", "exit_final"]
    gates = [st["exit"]["gate"] for st in plan["steps"]]
    assert [g["rule"] for g in gates] == ["max_softmax", "max_softmax", "always"]
    assert gates[0]["threshold"] == pytest.approx(0.6, abs=1e-3) and gates[1]["threshold"] == pytest.approx(0.8, abs=1e-3)
    md = (out / "report.md").read_text()
    assert "## Stages" in md and "## Exits and gates" in md and "## Evaluation" in md
    assert md.count("bit-exact") >= 3 and "stage2" in md
    # qdeploy run on the program: predictions + exit indices equal the host-gated reference decision
    r = CliRunner().invoke(app, ["run", str(out), "-i", str(d / "x.npy"), "-o", str(d / "pred.npy")])
    assert r.exit_code == 0, r.output
    pred, ex = np.load(d / "pred.npy"), np.load(d / "pred_exit.npy")
    msm = MultiStageModel.load(out)
    x = np.load(d / "x.npy")
    want_p, want_e = msm.decide(exit_codes(msm, x))
    np.testing.assert_array_equal(pred, want_p)
    np.testing.assert_array_equal(ex, want_e)
    # the default gate is 'never': every input leaves at the final exit
    r = CliRunner().invoke(app, ["compile-early-exit", str(path), "-t", "reference", "-o", str(d / "never"),
                                 "--golden", str(d / "x.npy")])
    assert r.exit_code == 0, r.output
    p2, e2 = MultiStageModel.load(d / "never").predict(x)
    assert (e2 == 2).all()


def test_compile_early_exit_errors(branchy, tmp_path):
    from typer.testing import CliRunner

    from qdeploy.cli import app
    d, path = branchy
    run = lambda *a: CliRunner().invoke(app, ["compile-early-exit", str(path), "-t", "reference", *a])
    r = run("-o", str(tmp_path / "a"), "--gate", "max_softmax")
    assert r.exit_code == 2 and "needs --thresholds" in r.output
    r = run("-o", str(tmp_path / "b"), "--gate", "max_softmax", "--thresholds", "0.9,0.9,0.9")
    assert r.exit_code == 2 and "need 2 thresholds" in r.output
    r = run("-o", str(tmp_path / "c"), "--exits", "exit_final")
    assert r.exit_code == 2 and "cannot identify exits" in r.output and "Traceback" not in r.output
    r = run("-o", str(tmp_path / "d"), "--exits", "nope,exit_final")
    assert r.exit_code == 2 and "nope" in r.output
    r = run("-o", str(tmp_path / "e"), "--gate", "max_softmax", "--thresholds", "abc")
    assert r.exit_code == 2 and "expected numbers" in r.output
    r = run("-o", str(tmp_path / "f"), "--gate", "maxsoftmax", "--thresholds", "0.9")
    assert r.exit_code == 2 and "unknown gate rule" in r.output
    r = run("-o", str(tmp_path / "g"), "--exits", "exit_final,exit_pool1")
    assert r.exit_code == 2 and "earliest (cheapest) first" in r.output
    # gate/threshold errors come after the stages compiled: the program must not be left behind
    assert not any((tmp_path / c).exists() for c in "abcdefg"), sorted(p.name for p in tmp_path.iterdir())
