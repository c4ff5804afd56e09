"""Behaviour a new user found wanting: --force safety, run/golden file handling, exit codes."""
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

import qdeploy
from qdeploy.cli import app
from qdeploy.compiler.errors import QDeployError

from tests.conftest import small_mlp


def _save_onnx_graph(tmp_path, rng):
    # a reference-target artifact from an IR graph, plus a model file via the QONNX exporter
    from qdeploy.compiler.frontends import export_qonnx
    import onnx
    p = tmp_path / "m.onnx"
    onnx.save(export_qonnx(small_mlp(rng)), str(p))
    return p


def test_force_never_deletes_non_artifacts(tmp_path, rng, monkeypatch):
    g = small_mlp(rng)
    keep = tmp_path / "mydata"
    keep.mkdir()
    (keep / "precious.txt").write_text("x")
    with pytest.raises(QDeployError, match="not a qdeploy artifact"):
        qdeploy.compile(g, "reference", keep, force=True)
    assert (keep / "precious.txt").read_text() == "x"
    monkeypatch.chdir(keep)
    with pytest.raises(QDeployError, match="working directory"):
        qdeploy.compile(g, "reference", ".", force=True)
    with pytest.raises(QDeployError, match="working directory"):
        qdeploy.compile(g, "reference", "..", force=True)
    assert (keep / "precious.txt").exists()
    # an earlier artifact is replaced
    qdeploy.compile(g, "reference", tmp_path / "art")
    qdeploy.compile(g, "reference", tmp_path / "art", force=True)
    assert (tmp_path / "art" / "manifest.json").is_file()


def test_force_refuses_directory_holding_the_model(tmp_path, rng):
    p = _save_onnx_graph(tmp_path / "", rng)
    with pytest.raises(QDeployError, match="source model"):
        qdeploy.compile(str(p), "reference", tmp_path, force=True)
    assert p.exists()


def test_run_output_handling(tmp_path, rng):
    g = small_mlp(rng)
    qdeploy.compile(g, "reference", tmp_path / "art")
    x = rng.uniform(-1, 1, (5, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = CliRunner().invoke(app, ["run", str(tmp_path / "art"), "-i", str(tmp_path / "x.npy"),
                                 "-o", str(tmp_path / "new" / "dir" / "y")])
    assert r.exit_code == 0, r.output
    out = tmp_path / "new" / "dir" / "y.npy"
    assert f"wrote {out}" in r.output and np.load(out).shape == (5, 8)
    np.savez(tmp_path / "x.npz", x=x)
    r = CliRunner().invoke(app, ["run", str(tmp_path / "art"), "-i", str(tmp_path / "x.npz"), "-o", str(tmp_path / "z.npy")])
    assert r.exit_code == 0 and np.array_equal(np.load(tmp_path / "z.npy"), np.load(out))
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    r = subprocess.run([sys.executable, "-m", "qdeploy.cli", "run", str(tmp_path / "art"), "-i", str(tmp_path / "junk.npy"),
                        "-o", str(tmp_path / "q.npy")], capture_output=True, text=True)
    assert r.returncode == 2 and "not a NumPy" in r.stderr and "pickle" not in r.stderr


def test_output_paths_that_are_files_or_directories_are_named(tmp_path, rng):
    """`run -o DIR` must not write DIR.npy beside the directory; a path under a file says so (not
    'File exists'); `compile -o FILE` is refused with or without --force, naming the file."""
    g = small_mlp(rng)
    qdeploy.compile(g, "reference", tmp_path / "art")
    np.save(tmp_path / "x.npy", rng.uniform(-1, 1, (3, 16)).astype(np.float32))
    (tmp_path / "outdir").mkdir()
    (tmp_path / "afile").write_text("keep")
    run = ["run", str(tmp_path / "art"), "-i", str(tmp_path / "x.npy"), "-o"]
    r = CliRunner().invoke(app, run + [str(tmp_path / "outdir")])
    assert r.exit_code == 2 and "is a directory" in r.output, r.output
    assert not (tmp_path / "outdir.npy").exists() and list((tmp_path / "outdir").iterdir()) == []
    r = CliRunner().invoke(app, run + [str(tmp_path / "afile" / "y.npy")])
    assert r.exit_code == 2 and "afile is a file, not a directory" in r.output, r.output
    for force in (False, True):
        with pytest.raises(QDeployError, match="afile is a file, not a directory"):
            qdeploy.compile(g, "reference", tmp_path / "afile", force=force)
    assert (tmp_path / "afile").read_text() == "keep"


def test_golden_check_rejects_npy_and_negative_tolerance(tmp_path, rng):
    qdeploy.compile(small_mlp(rng), "reference", tmp_path / "art")
    np.save(tmp_path / "g.npy", np.zeros(3))
    r = CliRunner().invoke(app, ["golden", "check", str(tmp_path / "art"), str(tmp_path / "g.npy")])
    assert r.exit_code == 2 and "not a qdeploy golden file" in r.output
    qdeploy.golden.record(tmp_path / "art", tmp_path / "g.npz")
    r = CliRunner().invoke(app, ["golden", "check", str(tmp_path / "art"), str(tmp_path / "g.npz"), "--tolerance", "-1"])
    assert r.exit_code == 2 and "tolerance" in r.output


def test_config_unknown_key_and_bad_golden_samples(tmp_path, rng):
    with pytest.raises(QDeployError, match="unknown key.*'input_typ'"):
        qdeploy.compile(small_mlp(rng), "reference", tmp_path / "a", config={"input_typ": "auto"})
    with pytest.raises(QDeployError, match="golden.samples must be an integer >= 1"):
        qdeploy.compile(small_mlp(rng), "reference", tmp_path / "a", config={"golden": {"samples": 0}})
    assert not (tmp_path / "a").exists()


def test_compile_exit_1_when_fixed_outputs_differ(tmp_path, rng, monkeypatch):
    from qdeploy.backends.reference import ReferenceBackend
    orig = ReferenceBackend.load

    def broken(self, out_dir, info, graph=None):
        fn = orig(self, out_dir, info, graph)
        return lambda feeds: {k: v + 1 for k, v in fn(feeds).items()}
    monkeypatch.setattr(ReferenceBackend, "load", broken)
    p = _save_onnx_graph(tmp_path, rng)
    t = ["--input-type", "fixed<16,6,RND_CONV,SAT>"]  # chosen, not guessed: the source check passes
    r = CliRunner().invoke(app, ["compile", str(p), "-t", "reference", "-o", str(tmp_path / "o"), *t])
    assert r.exit_code == 1 and "NOT bit-exact" in r.output, r.output
    r = CliRunner().invoke(app, ["compile", str(p), "-t", "reference", "-o", str(tmp_path / "o2"), "--allow-inexact", *t])
    assert r.exit_code == 0


def test_keras_files_rejected_clearly(tmp_path):
    p = tmp_path / "model.h5"
    p.write_bytes(b"\x89HDF")
    with pytest.raises(QDeployError, match="unsupported model file type '.h5'"):
        qdeploy.load(str(p))


def test_force_refuses_foreign_manifest(tmp_path, rng):
    other = tmp_path / "myext"
    other.mkdir()
    (other / "manifest.json").write_text('{"name": "browser extension", "version": "1"}')
    (other / "background.js").write_text("x")
    with pytest.raises(QDeployError, match="not a qdeploy artifact"):
        qdeploy.compile(small_mlp(rng), "reference", other, force=True)
    assert (other / "background.js").exists()


def test_model_spec_imports_siblings_and_cwd(tmp_path, monkeypatch):
    (tmp_path / "helpers_mod.py").write_text(
        "import torch\n"
        "def build():\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())\n"
        "    return m, torch.zeros(1, 4)\n")
    (tmp_path / "spec_file.py").write_text("from helpers_mod import build\n\ndef make():\n    return build()\n")
    g = qdeploy.load(f"{tmp_path / 'spec_file.py'}:make")
    assert [n.op for n in g.nodes][:1] == ["Dense"]
    monkeypatch.chdir(tmp_path)
    g2 = qdeploy.load("helpers_mod:build")
    assert g2.value(g2.inputs[0]).shape == (4,)


def test_tvm_rejects_nan_like_reference(tmp_path, rng):
    g = small_mlp(rng)
    qdeploy.compile(g, "tvm-llvm", tmp_path / "t")
    x = rng.uniform(-1, 1, (2, 16)).astype(np.float32)
    x[1, 3] = np.nan
    from qdeploy.compiler.errors import FeedError
    with pytest.raises(ValueError, match="NaN") as ei:  # a FeedError, which is also a ValueError
        qdeploy.CompiledModel.load(tmp_path / "t").predict(x)
    assert isinstance(ei.value, FeedError) and "sample(s) [1]" in ei.value.one_line()
    from qdeploy.compiler.reference import execute
    with pytest.raises(FeedError, match=r"sample\(s\) \[1\]"):  # the reference interpreter names it too
        execute(g, {g.inputs[0]: x})


@pytest.mark.parametrize("target", ["reference", "tvm-llvm"])
def test_complex_and_string_inputs_are_refused_naming_the_input(tmp_path, rng, target):
    """A complex array lost its imaginary part with a NumPy warning; a string array failed inside
    NumPy without naming the input.  Both are one FeedError naming the input, on every path."""
    from qdeploy.compiler.errors import FeedError
    from qdeploy.compiler.reference import execute
    g = small_mlp(rng)
    qdeploy.compile(g, target, tmp_path / "a")
    m = qdeploy.CompiledModel.load(tmp_path / "a")
    x = rng.uniform(-1, 1, (3, 16))
    name = g.inputs[0]
    for bad in (x + 1j, x.astype(str)):
        with pytest.raises(FeedError, match=rf"input '{name}' has dtype"):
            m.predict(bad)
        with pytest.raises(FeedError, match=rf"input '{name}' has dtype"):
            execute(g, {name: bad})
    assert m.predict(x.astype(np.float32)).shape == (3, 8)  # real arrays still run
