"""One hls4ml configuration for compile and estimate: CLI flags on compile, per-layer reuse
factors keyed by IR node name, and reuse factors legalized the way hls4ml does it, identical in
the written project, the manifest and the estimate."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from qdeploy.backends.hls4ml.settings import closest_reuse_factor, full_part
from qdeploy.cli import app
from tests.conftest import REALCASES, needs_realcases

pytest.importorskip("hls4ml")

JSC = REALCASES / "jsc-qkeras-3layer" / "qkeras_jettagging.onnx"


def test_closest_reuse_factor_is_hls4mls():
    from hls4ml.backends import get_backend
    be = get_backend("Vitis")
    for n_in, n_out in ((16, 64), (64, 32), (32, 5), (9, 8), (7, 3), (27, 16)):
        valid = be.get_valid_reuse_factors(n_in, n_out)
        for rf in range(1, n_in * n_out + 3):
            want = rf if rf in valid else be.get_closest_reuse_factor(valid, rf)
            assert closest_reuse_factor(n_in, n_out, rf, "Resource") == want, (n_in, n_out, rf)
        assert closest_reuse_factor(n_in, n_out, n_in * n_out + 5, "Latency") == n_in * n_out


def test_short_part_names_become_full_part_numbers():
    assert full_part("vu9p") == full_part("xcvu9p") == "xcvu9p-flga2104-2L-e"
    assert full_part("pynq-z2") == "xc7z020clg400-1"
    assert full_part("xcvu13p-fsga2577-1-e") == "xcvu13p-fsga2577-1-e"  # a full part number is kept


@needs_realcases
def test_compile_flags_and_per_layer_reuse_factors_agree_with_estimate(tmp_path):
    x = np.load(REALCASES / "jsc-qkeras-3layer" / "synthetic_input_uniform_pm1_64x16.npy").astype(np.float32)[:16]
    np.save(tmp_path / "x.npy", x)
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump({"hls4ml": {"reuse_factor": {"MatMul_1": 5, "default": 1}}}))
    out = tmp_path / "art"
    r = CliRunner().invoke(app, ["compile", str(JSC), "-t", "hls4ml", "-o", str(out), "--golden", str(tmp_path / "x.npy"),
                                 "-c", str(cfg), "--strategy", "Resource", "--part", "vu9p", "--clock-period", "4",
                                 "--reuse-factor", "7"])
    assert r.exit_code == 0, r.output
    assert "MatMul_0 7 -> 8" in r.output  # the flag overrides the config's reuse_factor mapping
    man = json.loads((out / "manifest.json").read_text())["backend"]
    rep = json.loads((out / "report.json").read_text())
    assert man["part"] == "xcvu9p-flga2104-2L-e" and man["clock_period"] == 4.0 and man["strategy"] == "Resource"
    assert man["reuse_factors"] == rep["estimate"]["reuse_factors"]
    assert man["reuse_factors"]["MatMul_0"] == {"requested": 7, "used": 8, "n_in": 16, "n_out": 64}
    hcfg = yaml.safe_load((out / "hls4ml_prj" / "hls4ml_config.yml").read_text())["HLSConfig"]["LayerName"]
    used = {v["used"] for v in man["reuse_factors"].values()}
    assert {c["ReuseFactor"] for c in hcfg.values() if "ReuseFactor" in c} == used
    assert rep["exactness"]["bit_exact"]

    # per-layer mapping from the config alone (no flag): only the named node changes
    out2 = tmp_path / "art2"
    r = CliRunner().invoke(app, ["compile", str(JSC), "-t", "hls4ml", "-o", str(out2), "--golden", str(tmp_path / "x.npy"),
                                 "-c", str(cfg), "--strategy", "Resource"])
    assert r.exit_code == 0, r.output
    rfs = json.loads((out2 / "manifest.json").read_text())["backend"]["reuse_factors"]
    assert rfs["MatMul_1"]["requested"] == 5 and rfs["MatMul_0"]["requested"] == 1
    assert rfs["MatMul_1"]["used"] == closest_reuse_factor(64, 32, 5, "Resource")
    # qdeploy estimate reads the same config file and reports the same per-layer reuse factors
    r = CliRunner().invoke(app, ["estimate", str(JSC), "-c", str(cfg), "--strategy", "Resource", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["reuse_factors"] == rfs

    # a mapping naming a node that does not exist is an error, not ignored
    cfg.write_text(yaml.safe_dump({"hls4ml": {"reuse_factor": {"fc9": 2}}}))
    r = CliRunner().invoke(app, ["compile", str(JSC), "-t", "hls4ml", "-o", str(tmp_path / "art3"), "-c", str(cfg),
                                 "--golden", str(tmp_path / "x.npy")])
    assert r.exit_code == 2 and "unknown node(s) ['fc9']" in r.output and not (tmp_path / "art3").exists()


@needs_realcases
def test_progress_stages_and_a_warning_before_building_an_oversized_io_parallel_design(tmp_path):
    import qdeploy
    x = np.load(REALCASES / "jsc-qkeras-3layer" / "synthetic_input_uniform_pm1_64x16.npy").astype(np.float32)[:8]
    seen = []
    qdeploy.compile(str(JSC), "hls4ml", tmp_path / "a", golden=x, config={"hls4ml": {"part": "pynq-z2"}},
                    progress=seen.append)
    warn = [i for i, s in enumerate(seen) if s.startswith("WARNING:") and "io_stream" in s]
    build = [i for i, s in enumerate(seen) if s.startswith("building")]
    assert warn and build and warn[0] < build[0], seen
    assert seen[0] == "importing the model" and any(s.startswith("running the source") for s in seen)
    seen.clear()  # the same design on a large part: no warning
    qdeploy.compile(str(JSC), "hls4ml", tmp_path / "b", golden=x, config={"hls4ml": {"part": "vu9p"}},
                    progress=seen.append)
    assert not any(s.startswith("WARNING:") for s in seen)


@needs_realcases
def test_catapult_jet_tagger_compiles_exactly_with_an_asic_estimate(tmp_path):
    import qdeploy
    x = np.load(REALCASES / "jsc-qkeras-3layer" / "synthetic_input_uniform_pm1_64x16.npy").astype(np.float32)
    res = qdeploy.compile(str(JSC), "hls4ml", tmp_path / "a", golden=x,
                          config={"hls4ml": {"backend": "Catapult", "clock_period": 10}, "asic": {"node_nm": 45}})
    rep = res.report
    assert rep["exactness"]["bit_exact"] and rep["exactness"]["samples"] == 64
    est = rep["estimate"]
    assert est["total"]["area_mm2"] > 0 and est["total"]["energy_nj"] > 0 and est["config"]["node_nm"] == 45
    readme = (tmp_path / "a" / "hls4ml_prj" / "README.md").read_text()
    assert "catapult -product ultra" in readme


@needs_realcases
def test_catapult_project_readme_testbench_command_works(tmp_path):
    """The Catapult project's README gives the g++ command of its own (Catapult) testbench, which
    takes the weights folder and the tb_data files as arguments; it reproduces the expected outputs."""
    import re
    import subprocess
    import qdeploy
    x = np.load(REALCASES / "jsc-qkeras-3layer" / "synthetic_input_uniform_pm1_64x16.npy").astype(np.float32)[:12]
    res = qdeploy.compile(str(JSC), "hls4ml", tmp_path / "a", golden=x, config={"hls4ml": {"backend": "Catapult"}})
    assert res.report["estimate"]["config"]["clock_period"] == 5.0  # the project's clock, not the ASIC default
    prj = tmp_path / "a" / "hls4ml_prj"
    cmd = re.search(r"Without the vendor tool: `([^`]*)`", (prj / "README.md").read_text()).group(1)
    assert "ac_types" in cmd
    r = subprocess.run(cmd.replace("-O1", "-O0"), shell=True, cwd=prj, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    got = [[float(v) for v in ln.split()] for ln in (prj / "tb_data/csim_results.log").read_text().splitlines() if ln.strip()]
    want = [[float(v) for v in ln.split()] for ln in (prj / "tb_data/tb_output_predictions.dat").read_text().splitlines()]
    assert got == want and len(got) == 12
