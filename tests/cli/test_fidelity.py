"""Fidelity to the source: every compile of a QONNX/ONNX model runs the source model (qonnx's
executor) on the golden inputs and compares it with the reference interpreter."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

import qdeploy
import qdeploy.api
from qdeploy.cli import app
from qdeploy.compiler.ir.graph import rebuild
from qdeploy.fidelity import batch_plan, fidelity_sentence

from ..conftest import REALCASES, needs_realcases

BNN = REALCASES / "hls4ml-bnn-fc-1layer"
TFC = REALCASES / "qonnx-zoo-tfc-mnist"


def _tfc_inputs():
    x = np.load(TFC / "mnist_test_digits_7210_0to255.npy").astype(np.float32) / 255.0
    return x.reshape(-1, 1, 28, 28)


@needs_realcases
def test_realcase_cli_reports_fidelity_with_no_mismatch(tmp_path):
    np.save(tmp_path / "x.npy", np.load(BNN / "input_pm1_8x3.npy"))
    r = CliRunner().invoke(app, ["compile", str(BNN / "bnn_model_fc_1layer.onnx"), "-t", "reference",
                                 "-o", str(tmp_path / "out"), "--golden", str(tmp_path / "x.npy")])
    assert r.exit_code == 0, r.output
    assert "fidelity vs source: 8 golden samples, 8 matching" in r.output and "matches the source" in r.output
    fid = json.loads((tmp_path / "out" / "report.json").read_text())["fidelity"]
    assert fid["checked"] and fid["ok"] and fid["samples"] == 8 and fid["mismatches"] == 0
    assert fid["max_abs_error"] == 0.0 and fid["max_lsb_error"] == 0.0 and fid["argmax_agreement"] == 1.0
    assert "## Fidelity to the source model" in (tmp_path / "out" / "report.md").read_text()


@needs_realcases
@pytest.mark.parametrize("golden", ["user", "random"])
def test_realcase_tfc_fidelity(tmp_path, golden):
    x = _tfc_inputs() if golden == "user" else None
    res = qdeploy.compile(str(TFC / "TFC_1W2A.onnx"), "reference", tmp_path / "o", golden=x)
    fid = res.report["fidelity"]
    assert fid["checked"] and fid["ok"], fid
    assert fid["samples"] == (4 if golden == "user" else 64) and fid["exact_matches"] == fid["samples"]
    assert fid["argmax_agreement"] == 1.0


@needs_realcases
def test_jet_tagger_default_input_rounding_is_measured_not_hidden(tmp_path):
    # no input quantizer, no input_type, random float golden inputs: the artifact rounds them to
    # hls4ml's default fixed<16,6>; the source runs on the unrounded inputs, so the outputs that
    # rounding changes are mismatches and the compile says to set input_type (it used to feed the
    # source the rounded inputs and report "matches the source")
    onnx_path = str(REALCASES / "jsc-qkeras-3layer" / "qkeras_jettagging.onnx")
    with pytest.raises(qdeploy.api.SourceMismatchError) as ei:
        qdeploy.compile(onnx_path, "reference", tmp_path / "o")
    fid = ei.value.fidelity
    assert fid["inputs_rounded_by_default"] > 0 and fid["real_mismatches"] > 0, fid
    assert "input_type" in ei.value.one_line() and "fixed<16,6" in ei.value.one_line()
    assert not (tmp_path / "o").exists()
    # the same rounding chosen by the user: the source sees the user's rounding (it is theirs)
    res = qdeploy.compile(onnx_path, "reference", tmp_path / "u", input_type="fixed<16,6,RND_CONV,SAT>")
    fid = res.report["fidelity"]
    assert fid["ok"] and fid["inputs_rounded"] > 0 and not fid.get("inputs_rounded_by_default"), fid
    assert "rounded to the artifact's input type" in fidelity_sentence(fid)
    # and on the CLI
    r = CliRunner().invoke(app, ["compile", onnx_path, "-t", "reference", "-o", str(tmp_path / "c")])
    assert r.exit_code == 1 and "--input-type" in r.output, r.output
    r = CliRunner().invoke(app, ["compile", onnx_path, "-t", "reference", "-o", str(tmp_path / "c"),
                                 "--input-type", "fixed<16,6,RND_CONV,SAT>"])
    assert r.exit_code == 0, r.output


def _perturbing_load(real_load):
    """``qdeploy.api.load`` whose graph has the weights of its first layer negated: what a
    frontend bug looks like (reference and target agree, the source does not)."""
    def load(model, example_input=None):
        g = real_load(model, example_input)
        nodes = list(g.nodes)
        i = next(k for k, n in enumerate(nodes) if "weight" in n.params)
        w = nodes[i].params["weight"]
        data = -np.array(w.data, copy=True)  # every weight of the first layer negated
        nodes[i] = nodes[i].replace(params={**nodes[i].params, "weight": type(w)(data, w.dtype)})
        return rebuild(g, nodes)
    return load


@needs_realcases
def test_reference_differing_from_source_fails_the_compile(tmp_path, monkeypatch):
    monkeypatch.setattr(qdeploy.api, "load", _perturbing_load(qdeploy.api.load))
    np.save(tmp_path / "x.npy", _tfc_inputs())
    args = ["compile", str(TFC / "TFC_1W2A.onnx"), "-t", "reference", "-o", str(tmp_path / "out"),
            "--golden", str(tmp_path / "x.npy")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1, r.output
    # a real mismatch: the float64 re-evaluation of the source disagrees with ours too
    assert "outputs (output 82) differ from the source model on" in r.output, r.output
    assert "real mismatches, not float32 rounding" in r.output and "--allow-inexact" in r.output
    assert "nothing was written" in r.output and not (tmp_path / "out").exists()
    r = CliRunner().invoke(app, args + ["--allow-inexact"])
    assert r.exit_code == 0, r.output
    assert "DIFFERS from the source" in r.output and "INEXACT, accepted by --allow-inexact" in r.output
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    fid = rep["fidelity"]
    assert rep["inexact"] and not fid["ok"] and fid["mismatches"] >= 1 and fid["max_abs_error"] > 0
    assert fid["real_mismatches"] == fid["differing_values"] > 0 and fid["float32_rounding"] == 0
    assert fid["classification"].startswith("re-evaluated in float64")


def test_batch_plan_refuses_ops_that_mix_samples():
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 1])
    ok = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g", [x], [y]))
    assert batch_plan(ok) == (True, "")
    bad = helper.make_model(helper.make_graph([helper.make_node("Transpose", ["x"], ["y"], name="t", perm=[1, 0])],
                                              "g", [x], [y]))
    okb, why = batch_plan(bad)
    assert not okb and "Transpose t moves the batch axis" in why
