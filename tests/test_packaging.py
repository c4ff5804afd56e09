"""The wheel: built from the tracked files alone, installed outside the source tree, it imports
every module of the package and runs ``qdeploy estimate --target asic`` (a hand-listed package
list once left ``qdeploy.backends.asic`` out of it)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import REALCASES, REPO, needs_realcases
from .test_architecture import discover_modules

JSC = REALCASES / "jsc-qkeras-3layer" / "qkeras_jettagging.onnx"


def _clean_copy(dest: Path) -> None:
    """The working tree's tracked files (plus new, not yet committed, non-ignored ones) into ``dest``."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():  # a tracked file deleted in the working tree is left out
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A directory holding qdeploy installed from a freshly built wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist, target = tmp / "src", tmp / "dist", tmp / "site"
    src.mkdir()
    _clean_copy(src)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    r = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(dist),
                        str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    wheels = list(dist.glob("qdeploy-*.whl"))
    assert len(wheels) == 1, wheels
    r = subprocess.run([*pip, "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheels[0])],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return target, wheels[0]


def _run_installed(target: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run Python on the installed copy only: ``-S`` skips site (so the editable install's path
    finder is not loaded); the wheel's directory comes first, then the dependencies'."""
    deps = [p for p in sys.path if p.endswith("site-packages")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *deps])}
    return subprocess.run([sys.executable, "-S", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def test_wheel_ships_every_package(installed):
    """Every package folder of the source tree is in the wheel (asic, new subpackages included)."""
    _target, wheel = installed
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    want = {str(Path(*m.split(".")) / "__init__.py") if is_pkg else str(Path(*m.split(".")).with_suffix(".py"))
            for m, (_p, is_pkg) in discover_modules().items()}
    missing = sorted(want - names)
    assert not missing, f"not in the wheel: {missing}"
    assert "qdeploy/backends/asic/__init__.py" in names


def test_installed_wheel_imports_every_module(installed, tmp_path):
    target, _wheel = installed
    mods = sorted(discover_modules())
    code = ("import importlib, json, sys\n"
            f"mods = {mods!r}\n"
            "for m in mods:\n"
            "    importlib.import_module(m)\n"
            "import qdeploy\n"
            "print(json.dumps({'file': qdeploy.__file__, 'n': len(mods)}))\n")
    r = _run_installed(target, ["-c", code], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(out["file"]).resolve().is_relative_to(target.resolve()), out["file"]  # not the source tree
    assert out["n"] == len(mods) > 50


@needs_realcases
def test_installed_wheel_runs_asic_estimate(installed, tmp_path):
    target, _wheel = installed
    r = _run_installed(target, ["-m", "qdeploy.cli", "estimate", str(JSC), "--target", "asic", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    est = json.loads(r.stdout)
    assert est["total"]["area_mm2"] > 0 and est["total"]["power_mw"] > 0
