"""QAT fan-out (compiler/quantization/fanout.py): the (allocation x seed) fine-tunes give identical
results in this process, on 2 local worker processes and on a local Ray; a worker killed mid-job is
replaced and its job retried once (recorded in the report); a job that fails twice is a one-line
error naming it; bad settings are one-line errors."""
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qdeploy.cli import app
from qdeploy.compiler.errors import QDeployError
from qdeploy.compiler.quantization.fanout import resolve_workers, run_qat_jobs
from qdeploy.compiler.quantization.fanout_jobs import KILL_ENV, QatContext, QatJob
from qdeploy.compiler.quantization.search import run_search
from qdeploy.compiler.quantization.search_report import engine_fingerprint

RECIPE = str(Path(__file__).with_name("test_search.py")) + ":tiny_recipe"
SETTINGS = dict(budgets=[{"bops": "uniform:4"}], w_bits=(3, 4), probes=10, qat_seeds=2, progress=False,
                check_import=False)  # (the QONNX import is checked by test_search.py)


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    out = tmp_path_factory.mktemp("fanout") / "serial"
    rep = run_search(RECIPE, out, workers=1, **SETTINGS)
    return out, rep


def test_serial_engine_runs_every_job_in_process(serial):
    out, rep = serial
    fo = rep["qat_fanout"]
    assert fo["engine"] == "serial" and fo["workers"] == 1 and fo["retried"] == [] and fo["failed"] == []
    # the Hessian allocation and uniform 4 bits, 2 seeds each (a coinciding allocation is trained once)
    n_alloc = len({r[1] for r in engine_fingerprint(out, rep)})
    assert fo["jobs"] == 2 * n_alloc and n_alloc == 2 and fo["job_cpu_seconds"] > 0
    assert "QAT jobs:" in (out / "search_report.md").read_text()


def test_local_workers_identical_to_serial_and_killed_worker_retried(serial, tmp_path, monkeypatch):
    out0, rep0 = serial
    monkeypatch.setenv(KILL_ENV, "b0_hessian seed 1")  # that job's first attempt os._exit()s its worker
    out = tmp_path / "local"
    rep = run_search(RECIPE, out, workers=2, **SETTINGS)
    fo = rep["qat_fanout"]
    assert fo["engine"] == "local" and fo["workers"] == 2 and fo["failed"] == []
    assert fo["retried"] == [{"job": "b0_hessian seed 1", "reason": "worker process died (exit code 17)"}]
    assert rep["budgets"][0]["hessian"]["qat_retries"] == 1
    assert "retried once: b0_hessian seed 1" in (out / "search_report.md").read_text()
    assert engine_fingerprint(out, rep) == engine_fingerprint(out0, rep0)


def test_ray_identical_to_serial_and_killed_worker_retried(serial, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'qdeploy[ray]'); CI installs it")
    out0, rep0 = serial
    monkeypatch.setenv(KILL_ENV, "b0_uniform4 seed 0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "ray"
        rep = run_search(RECIPE, out, ray="auto", **SETTINGS)
    finally:
        ray.shutdown()
    fo = rep["qat_fanout"]
    assert fo["engine"] == "ray" and fo["workers"] == 2 and fo["ray_address"] and fo["failed"] == []
    assert [r["job"] for r in fo["retried"]] == ["b0_uniform4 seed 0"]
    assert engine_fingerprint(out, rep) == engine_fingerprint(out0, rep0)


def _ctx():
    x = np.random.default_rng(0).random((40, 64), dtype=np.float32)
    y = np.arange(40) % 10
    from torch import nn
    m = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))
    return QatContext(model=m, x_tr=x, y_tr=y, x_va=x, y_va=y, test=None, inp={"bits": 5, "scale": 2.0 ** -4,
                      "signed": False}, qcfg={"epochs": 1, "lr": 1e-3, "batch_size": 16}, ns=40, seed=0, name="t",
                      export=False)


def test_job_failing_twice_is_one_error_after_the_other_jobs():
    good = QatJob(tag="good", k=0, bits=(("0", (4, 4)), ("2", (4, 4))))
    bad = QatJob(tag="bad", k=0, bits=(("0", (4, 4)),))  # layer "2" has no bits: build_qat_model raises
    with pytest.raises(QDeployError, match=r"1 of 2 jobs failed twice.*bad seed 0: QDeployError: no bit widths "
                                           r"given for layer '2'"):
        run_qat_jobs(_ctx(), [bad, good], workers=1)
    res, info = run_qat_jobs(_ctx(), [good], workers=1)
    assert info["engine"] == "serial" and res["good seed 0"].val_ok.shape == (40,)


def test_bad_settings(monkeypatch):
    with pytest.raises(QDeployError, match="workers must be a positive integer or 'auto', got 0"):
        resolve_workers(0, 3)
    with pytest.raises(QDeployError, match="workers must be"):
        resolve_workers(True, 3)
    assert resolve_workers("auto", 1) == 1 and resolve_workers(3, 1) == 3
    r = CliRunner().invoke(app, ["search", RECIPE, "-o", "/tmp/never", "--budget", "bops=uniform:4", "--workers", "two",
                                 "--no-progress"])
    assert r.exit_code == 2 and "--workers 'two': expected a positive integer or 'auto'" in r.output
    r = CliRunner().invoke(app, ["search", RECIPE, "-o", "/tmp/never", "--budget", "bops=uniform:4", "--workers", "-1",
                                 "--no-progress"])
    assert r.exit_code == 2 and "workers must be a positive integer" in r.output
    monkeypatch.setenv("QDEPLOY_QAT_WORKERS", "many")
    with pytest.raises(QDeployError, match="environment variable QDEPLOY_QAT_WORKERS='many': expected a positive"):
        run_search(RECIPE, "/tmp/never", budgets=[{"bops": "uniform:4"}], progress=False)


def _children() -> set:
    """Live (not yet reaped) child processes of this process, from /proc."""
    import os
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid():
                out.add(int(d.name))
    return out


def _failing_recipe():
    raise ValueError("the recipe's data is missing")


def test_workers_started_early_are_stopped_when_the_search_fails(tmp_path):
    before = _children()
    with pytest.raises(ValueError, match="the recipe's data is missing"):
        run_search(_failing_recipe, tmp_path / "out", workers=2, **SETTINGS)  # the pool starts before the recipe
    assert _children() - before == set()  # both workers stopped (and reaped), nothing left behind
    assert not (tmp_path / "out").exists()
