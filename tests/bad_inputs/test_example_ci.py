"""examples/ci/golden_ci.sh, the CI example: it compiles the jsc-qkeras-3layer realcase and checks
the artifact against the committed golden file (reference and tvm-llvm targets); then one weight
of the compiled artifact's library is changed and the golden check must fail, readably."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REALCASES, REPO

SCRIPT = REPO / "examples" / "ci" / "golden_ci.sh"
CASE = REALCASES / "jsc-qkeras-3layer"
GOLDEN = REPO / "examples" / "ci" / "golden" / "qkeras_jettagging.golden.npz"

pytestmark = pytest.mark.skipif(not (CASE / "qkeras_jettagging.onnx").exists(), reason="realcase not available")


def _script(out: Path, target: str, **env):
    e = dict(os.environ, TARGET=target, OUT=str(out), QDEPLOY=f"{sys.executable} -m qdeploy.cli",
             REALCASE=str(CASE), **env)
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=e, cwd=out.parent, timeout=600)


def _tamper_one_weight(art: Path) -> Path:
    """A copy of the artifact's IR graph (``model.json``/``.npz``) with one weight code changed."""
    from qdeploy.compiler.ir import Graph

    g = Graph.load(str(art / "model"))
    _, arrays = g.to_json()
    key = sorted(k for k in arrays if k.endswith("_weight"))[0]
    w = arrays[key].copy()
    w[0, 0] = -w[0, 0] - 7
    arrays[key] = w
    np.savez(art / "model.npz", **arrays)
    return art


@pytest.mark.parametrize("target", ["reference", "tvm-llvm"])
def test_golden_ci_script_passes_then_catches_a_changed_weight(target, tmp_path):
    out = tmp_path / f"qdeploy-{target}"
    r = _script(out, target)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "golden check passed: 64 samples, 0 mismatches" in r.stdout, r.stdout
    assert "0 mismatching" in r.stdout and "Traceback" not in r.stderr

    man = json.loads((out / "manifest.json").read_text())
    if target == "reference":
        _tamper_one_weight(out)  # the reference target's library is model.json/model.npz
    else:  # rebuild the library from a tampered IR copy and put it in place of the artifact's .so
        from qdeploy.backends.tvm import TvmBackend

        info = dict(man["backend"])
        lib = out / info["library"]
        work = tmp_path / "tampered"
        shutil.copytree(out, work)
        _tamper_one_weight(work)
        TvmBackend("tvm-llvm").build(work, info)
        assert info["library"] != lib.name
        shutil.copyfile(work / info["library"], lib)

    bad = _script(out, target, SKIP_COMPILE="1")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    err = bad.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("golden check FAILED: "), bad.stderr
    for word in ("of 64 samples mismatch", "sample", "output 'global_out'", "expected", "got"):
        assert word in err[0], err[0]
    assert "Traceback" not in bad.stderr


def test_golden_ci_script_missing_golden_is_clear(tmp_path):
    r = _script(tmp_path / "o", "reference", GOLDEN=str(tmp_path / "nope.npz"))
    assert r.returncode == 2 and "RECORD=1" in r.stderr and not (tmp_path / "o").exists()


def test_committed_golden_matches_a_fresh_record(tmp_path):
    """The committed golden file is what `RECORD=1` would write today (outputs bit for bit)."""
    fresh = tmp_path / "fresh.npz"
    r = _script(tmp_path / "o", "reference", RECORD="1", GOLDEN=str(fresh))
    assert r.returncode == 0, r.stderr
    with np.load(GOLDEN) as a, np.load(fresh) as b:
        for k in a.files:
            if k != "__meta__":
                assert np.array_equal(a[k], b[k]), k


def test_workflow_runs_the_script():
    import yaml

    wf = yaml.safe_load((REPO / "examples" / "ci" / "github-actions.yml").read_text())
    steps = wf["jobs"]["golden"]["steps"]
    run = [s for s in steps if "golden_ci.sh" in s.get("run", "")]
    assert run and {"MODEL", "TARGET", "GOLDEN"} <= set(run[0]["env"])
    assert set(wf["jobs"]["golden"]["strategy"]["matrix"]["target"]) == {"reference", "tvm-llvm", "hls4ml"}
