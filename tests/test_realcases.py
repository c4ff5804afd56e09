"""End-to-end on the real third-party models in ../shared/realcases (never edited).

Each case compiles through the public API for every applicable target, the artifact reproduces
the case's expected outputs within the tolerance its README gives, and every backend is
bit-exact against our reference interpreter where the model is quantized.
"""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import qdeploy
from qdeploy.runtime import CompiledModel

from .conftest import REALCASES

pytestmark = pytest.mark.skipif(not REALCASES.is_dir(), reason="../shared/realcases not present")


def _compile(tmp_path, path, target, golden):
    res = qdeploy.compile(str(path), target=target, out_dir=tmp_path / target, golden=golden)
    return res, CompiledModel.load(tmp_path / target)


def _tfc_inputs():
    x = np.load(REALCASES / "qonnx-zoo-tfc-mnist" / "mnist_test_digits_7210_0to255.npy").astype(np.float32) / 255.0
    return x.reshape(-1, 1, 28, 28)


@pytest.mark.parametrize("target", ["hls4ml", "tvm-llvm"])
@pytest.mark.parametrize("variant", ["1W1A", "1W2A"])
def test_tfc_mnist(tmp_path, target, variant):
    case = REALCASES / "qonnx-zoo-tfc-mnist"
    x = _tfc_inputs()
    want = np.load(case / f"derived_TFC_{variant}_output_4x10.npy")
    res, m = _compile(tmp_path, case / f"TFC_{variant}.onnx", target, x)
    assert res.report["exactness"]["bit_exact"], res.report["exactness"]
    y = m.predict(x)
    assert list(y.argmax(1)) == [7, 2, 1, 0]
    np.testing.assert_allclose(y, want.reshape(y.shape), atol=1e-4)


@pytest.mark.parametrize("target", ["hls4ml", "tvm-llvm"])
def test_jet_tagger(tmp_path, target):
    case = REALCASES / "jsc-qkeras-3layer"
    x = np.load(case / "synthetic_input_uniform_pm1_64x16.npy")
    want = np.load(case / "derived_qonnx_output_64x5.npy")
    res, m = _compile(tmp_path, case / "qkeras_jettagging.onnx", target, x)
    ex = res.report["exactness"]
    assert ex["bit_exact"] and ex["samples"] == 64, ex
    y = m.predict(x)
    assert np.array_equal(y.argmax(1), want.argmax(1))
    np.testing.assert_allclose(y, want, atol=1e-5)
    # the input type was derived from the golden inputs (2^-16 grid): no input rounding
    assert any("exactly" in n for n in res.report["notes"])


@pytest.mark.parametrize("target", ["hls4ml", "tvm-llvm"])
def test_bnn_fc_1layer(tmp_path, target):
    case = REALCASES / "hls4ml-bnn-fc-1layer"
    x = np.load(case / "input_pm1_8x3.npy")
    want = np.load(case / "derived_qonnx_output_8x4.npy")
    res, m = _compile(tmp_path, case / "bnn_model_fc_1layer.onnx", target, x)
    assert res.report["exactness"]["bit_exact"]
    assert np.array_equal(m.predict(x), want.reshape(8, 4))


def test_mnist_cnn_float_tvm(tmp_path):
    case = REALCASES / "onnx-mnist-cnn"
    x = numpy_helper.to_array(onnx.load_tensor(str(case / "test_data_set_0" / "input_0.pb")))
    want = numpy_helper.to_array(onnx.load_tensor(str(case / "test_data_set_0" / "output_0.pb")))
    res, m = _compile(tmp_path, case / "model.onnx", "tvm-llvm", x)
    y = m.predict(x)
    np.testing.assert_allclose(y, want, atol=1e-3, rtol=1e-5)
    assert y.argmax() == 2


def test_residual_block_float_tvm(tmp_path):
    case = REALCASES / "qonnx-residual-block"
    x = np.load(case / "synthetic_input_1x1x200x200.npy")
    want = np.load(case / "derived_output.npy")
    res, m = _compile(tmp_path, case / "residual_block_clean.onnx", "tvm-llvm", x)
    np.testing.assert_allclose(m.predict(x), want, atol=1e-5, rtol=1e-5)
    # the report states the float error honestly: float32 rounding of reordered sums (outputs up to
    # ~190: 1e-5 of that is ~13 float32 ulp, reached with the vectorized default schedule), not more
    assert res.report["exactness"]["max_abs_error"] < 1e-5 * float(np.abs(want).max())


def test_float_model_rejected_by_hls4ml(tmp_path):
    case = REALCASES / "onnx-mnist-cnn"
    with pytest.raises(qdeploy.compiler.errors.QDeployError, match="fixed-point"):
        qdeploy.compile(str(case / "model.onnx"), target="hls4ml", out_dir=tmp_path / "h")
    assert not (tmp_path / "h").exists()
