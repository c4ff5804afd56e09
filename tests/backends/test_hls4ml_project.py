"""The hls4ml project qdeploy writes is one an FPGA engineer can take to Vitis HLS: its own
testbench (``myproject_test.cpp``, built here with g++ instead of ``vitis_hls -f build_prj.tcl
csim=1``) reads ``tb_data/`` and reproduces the golden outputs bit for bit; ``OutputDir`` in
``hls4ml_config.yml`` is the published folder; a README lists the ports."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import yaml

import qdeploy
from tests.conftest import REALCASES, needs_realcases

pytest.importorskip("hls4ml")
if shutil.which("g++") is None:
    pytest.skip("g++ is needed for the hls4ml C simulation", allow_module_level=True)


def _floats(path):
    return [[float(v) for v in line.split()] for line in path.read_text().splitlines() if line.strip()]


@needs_realcases
@pytest.mark.parametrize("io_type", ["io_parallel", "io_stream"])
def test_project_testbench_reproduces_golden_outputs(tmp_path, io_type):
    case = REALCASES / "jsc-qkeras-3layer"
    x = np.load(case / "synthetic_input_uniform_pm1_64x16.npy").astype(np.float32)[:40]
    out = tmp_path / "art"
    res = qdeploy.compile(str(case / "qkeras_jettagging.onnx"), target="hls4ml", out_dir=out, golden=x,
                          config={"hls4ml": {"io_type": io_type}})
    prj = out / "hls4ml_prj"
    assert yaml.safe_load((prj / "hls4ml_config.yml").read_text())["OutputDir"] == str((out / "hls4ml_prj").resolve())
    ins, want = _floats(prj / "tb_data/tb_input_features.dat"), _floats(prj / "tb_data/tb_output_predictions.dat")
    assert len(ins) == len(want) == 40 and len(ins[0]) == 16 and len(want[0]) == 5
    # the expected outputs are the artifact's own (device) outputs on the golden inputs
    assert res.report["exactness"]["bit_exact"]
    dev = qdeploy.CompiledModel.load(out).manifest["backend"]["device_outputs"][0]
    assert dev["shape"] == [5]
    md = (out / "report.md").read_text()
    assert "## hls4ml project" in md and f"`{io_type}`" in md and f"| out | {dev['port']} | {dev['layer']} |" in md
    top = (prj / "firmware" / "myproject.h").read_text()
    assert dev["port"] in top  # the argument name of the top function
    weights = sorted(p.name for p in (prj / "firmware" / "weights").glob("w*.h"))
    assert weights and all(f"`{w}`" in md for w in weights)  # every weight header is mapped to its IR node
    assert "Testbench data (`tb_data/`): 40 samples" in md
    readme = (prj / "README.md").read_text()
    assert dev["layer"] in readme and "csim=1" in readme and "40 samples, from the golden inputs" in readme
    # build and run the project's own testbench (what vitis_hls csim does, with g++)
    assert "-DWEIGHTS_DIR" in readme
    r = subprocess.run(["g++", "-O0", "-std=c++17", "-w", "-Ifirmware", "-Ifirmware/ap_types",
                        '-DWEIGHTS_DIR="firmware/weights"', "myproject_test.cpp",
                        "firmware/myproject.cpp", "-o", "tb"], cwd=prj, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(["./tb"], cwd=prj, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Unable to open" not in r.stdout, r.stdout[-2000:]
    got = _floats(prj / "tb_data/csim_results.log")
    assert got == want
    assert len({tuple(g) for g in got}) > 10  # real outputs, not one constant row


def test_project_readme_and_tb_data_for_random_golden(tmp_path):
    """Without golden inputs the README says the testbench data are random, with the seed."""
    from qdeploy.compiler.ir import Const, GraphBuilder, parse_type
    from qdeploy.compiler.ir.types import FloatType
    rng = np.random.default_rng(0)
    b = GraphBuilder("tiny")
    x = b.input("x", (6,), FloatType())
    h = b.add("q", "Quantize", [x], attrs={"to": parse_type("fixed<8,3,RND_CONV,SAT>")})
    h = b.add("fc", "Dense", [h], params={"weight": Const(rng.integers(-8, 8, (6, 4)), parse_type("fixed<4,0>"))})
    b.output(h)
    out = tmp_path / "art"
    qdeploy.compile(b.build(), target="hls4ml", out_dir=out)
    readme = (out / "hls4ml_prj" / "README.md").read_text()
    assert "random (no golden inputs were given: seed 0" in readme
    rows = _floats(out / "hls4ml_prj" / "tb_data/tb_input_features.dat")
    assert len(rows) == 64 and all(len(r) == 6 for r in rows)
    assert all(v * 32 == int(v * 32) for r in rows for v in r)  # device inputs: codes of fixed<8,3>
