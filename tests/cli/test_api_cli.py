import json
import subprocess
import sys

import numpy as np
import pytest

import qdeploy
from qdeploy.compiler.errors import QDeployError
from qdeploy.compiler.ir import FLOAT32, GraphBuilder, parse_type

from tests.conftest import small_mlp


def test_compile_reference_writes_complete_artifact(tmp_path, rng):
    g = small_mlp(rng)
    x = np.round(rng.uniform(-1, 1, (32, 16)) * 256) / 256
    res = qdeploy.compile(g, "reference", tmp_path / "out", golden=x)
    out = tmp_path / "out"
    for f in ("manifest.json", "report.json", "report.md", "golden.npz", "ir/model.json", "ir/model.txt"):
        assert (out / f).is_file(), f
    man = json.loads((out / "manifest.json").read_text())
    assert man["target"] == "reference" and man["exactness"]["bit_exact"]
    assert man["inputs"][0]["name"] == "x"
    assert res.report["exactness"]["samples"] == 32
    # the golden inputs were on a 2^-8 grid: the input type was derived to hold them exactly
    assert "fixed<" in res.report["notes"][0] and "exactly" in res.report["notes"][0]
    rep = res.report["layers"]
    fc = next(r for r in rep if r["name"] == "fc1")
    assert fc["bops"] > 0 and fc["params"] == 128 and fc["param_bits"] == 128 * 6
    y = qdeploy.CompiledModel.load(out).predict(x)
    assert np.array_equal(y, qdeploy.compiler.reference.run(res.graph, x))
    # existing directory: refused, untouched
    with pytest.raises(QDeployError, match="exists"):
        qdeploy.compile(g, "reference", out)


def test_failed_compile_leaves_no_directory(tmp_path, rng, monkeypatch):
    from qdeploy.backends.reference import ReferenceBackend

    def boom(self, out_dir, info):
        (tmp_path / "marker").write_text("built")
        raise RuntimeError("simulated build failure")
    monkeypatch.setattr(ReferenceBackend, "build", boom)
    with pytest.raises(QDeployError, match="simulated build failure"):
        qdeploy.compile(small_mlp(rng), "reference", tmp_path / "out")
    assert (tmp_path / "marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["marker"]


def test_interrupted_compile_leaves_no_staging_directory(tmp_path, rng, monkeypatch):
    from qdeploy.backends.reference import ReferenceBackend

    def interrupted(self, out_dir, info):
        raise KeyboardInterrupt  # Ctrl-C during the backend build
    monkeypatch.setattr(ReferenceBackend, "build", interrupted)
    with pytest.raises(KeyboardInterrupt):
        qdeploy.compile(small_mlp(rng), "reference", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither out/ nor a hidden .out.tmp-* folder


def test_output_directory_under_a_file_or_empty_is_clear(tmp_path, rng):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(QDeployError, match="afile is a file"):
        qdeploy.compile(small_mlp(rng), "reference", tmp_path / "afile" / "out")
    with pytest.raises(QDeployError, match="output directory name is empty"):
        qdeploy.compile(small_mlp(rng), "reference", "")
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


def test_unknown_target_is_clear(tmp_path, rng):
    with pytest.raises(QDeployError, match="unknown target 'fpga9000'"):
        qdeploy.compile(small_mlp(rng), "fpga9000", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qdeploy.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_bad_file_exit_2_one_line(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07garbage-not-a-model")
    r = _cli("compile", str(bad), "--target", "reference", "-o", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_report_md_carries_the_estimate(tmp_path, rng):
    res = qdeploy.compile(small_mlp(rng), "reference", tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    est = res.report["estimate"]
    assert "## Estimate (hls4ml, Virtex UltraScale+ VU9P; no vendor tool)" in md
    assert est["total"]["lut"] > 0 and f"| {est['total']['lut']} | {est['total']['ff']} |" in md


def test_nan_reaching_a_quantizer_names_the_node_and_sample():
    from qdeploy.compiler.errors import FeedError
    from qdeploy.compiler.reference import execute
    b = GraphBuilder("q")
    x = b.input("x", (4,), FLOAT32)
    b.output(b.add("in_q", "Quantize", [x], attrs={"to": parse_type("fixed<8,3>")}))
    g = b.build()
    a = np.zeros((3, 4), np.float32)
    a[2, 1] = np.nan
    with pytest.raises(FeedError) as ei:
        execute(g, {"x": a})
    msg = ei.value.one_line()
    assert "node 'in_q'" in msg and "sample(s) [2]" in msg and "NaN" in msg
    assert execute(g, {"x": np.ones((3, 4), np.float32)})  # finite inputs still run


def test_sigterm_during_compile_leaves_no_staging_directory(tmp_path):
    """SIGTERM (a CI timeout) unwinds like Ctrl-C: exit 143 and no .out.tmp-* folder left behind."""
    from tests.conftest import REALCASES
    model = REALCASES / "jsc-qkeras-3layer" / "qkeras_jettagging.onnx"
    if not model.exists():
        pytest.skip(f"{model} not found: set QDEPLOY_SHARED")
    code = (
        "import os, signal, sys, time\n"
        "from qdeploy.backends.reference import ReferenceBackend\n"
        "def build(self, out_dir, info):\n"
        "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
        "ReferenceBackend.build = build\n"
        "from qdeploy.cli import main\n"
        f"sys.argv = ['qdeploy', 'compile', {str(model)!r}, '-t', 'reference', '-o', {str(tmp_path / 'out')!r}, "
        "'--input-type', 'fixed<16,6,RND_CONV,SAT>']\n"
        "main()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 143, r.stderr[-500:]
    assert list(tmp_path.iterdir()) == []


def test_run_on_a_dynamic_program_says_how_to_load_it(tmp_path):
    prog = tmp_path / "dyn"
    prog.mkdir()
    (prog / "plan.json").write_text('{"format": 1, "kind": "dynamic", "target": "reference"}')
    np.save(tmp_path / "x.npy", np.zeros((1, 4), np.float32))
    r = _cli("run", str(prog), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"))
    assert r.returncode == 2, r.stdout + r.stderr
    err = (r.stdout + r.stderr).strip().splitlines()
    assert len(err) == 1 and "is a dynamic program" in err[0] and "DynamicModel.load" in err[0], err
    assert not (tmp_path / "y.npy").exists()
