"""Bad-input corpus: every case goes through ``qdeploy compile`` and must give exit code 2, exactly
one stderr line ``error: ...`` naming the culprit and the reason, no traceback, and no output
directory.  Most cases run in-process (typer's CliRunner); a few run ``python -m qdeploy.cli`` in a
subprocess to prove that nothing else (a traceback, a library warning) reaches the real stderr.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from qdeploy.cli import app

from .builders import Case, cases

CASES = cases()
BY_ID = {c.id: c for c in CASES}
#: run as real subprocesses (one per kind of failure: parse, importer check, backend, config, spec)
SUBPROCESS = ["truncated", "nan_weights", "cycle", "softmax_datapath_hls4ml", "gemm_transA",
              "config_bad_yaml", "spec_no_such_module_xyz"]


def _names(c: Case):
    return (c.culprit,) if isinstance(c.culprit, str) else tuple(c.culprit)


def _check(c: Case, code: int, stderr: str, stdout: str, outs):
    assert code == 2, (c.id, code, stdout, stderr)
    assert "Traceback" not in stderr and "Traceback" not in stdout, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, (c.id, stderr)
    line = lines[0]
    assert line.startswith("error: "), line
    for name in _names(c):
        assert name in line, (c.id, name, line)
    assert c.reason in line, (c.id, c.reason, line)
    out = outs / "OUT"
    assert not out.exists(), f"{c.id}: output directory left behind"
    leftovers = list(outs.iterdir()) if outs.exists() else []
    assert not leftovers, f"{c.id}: left {leftovers}"


def _args(c: Case, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    model, extra = c.build(src)
    outs = tmp_path / "outs"
    return ["compile", model, "--target", c.target, "-o", str(outs / "OUT"), *extra], outs


def test_corpus_is_big_enough():
    assert len(CASES) >= 30 and len(BY_ID) == len(CASES)
    assert {c.target for c in CASES} >= {"reference", "hls4ml", "tvm-llvm"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_cli(case, tmp_path):
    args, outs = _args(case, tmp_path)
    res = CliRunner().invoke(app, args)
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), res.exc_info
    _check(case, res.exit_code, res.stderr, res.stdout, outs)


@pytest.mark.parametrize("cid", SUBPROCESS)
def test_bad_input_subprocess(cid, tmp_path):
    case = BY_ID[cid]
    args, outs = _args(case, tmp_path)
    r = subprocess.run([sys.executable, "-m", "qdeploy.cli", *args], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    _check(case, r.returncode, r.stderr, r.stdout, outs)
