"""Fast checks of the digits example's training half (examples/digits/models.py).

Both models are trained for one short epoch on a subset, exported to QONNX, and checked:
every Quant scale is a power of two, every Conv/Gemm bias is quantized with
scale = input_scale * weight_scale, and qonnx's execute_onnx reproduces the Brevitas forward.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest


REPO = Path(__file__).resolve().parents[2]
MODELS_PY = REPO / "examples" / "digits" / "models.py"


def _load_models_module():
    spec = importlib.util.spec_from_file_location("digits_models_example", MODELS_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dm():
    return _load_models_module()


@pytest.fixture(scope="module")
def trained(dm, tmp_path_factory):
    """name -> (model, x_test subset, exported path)."""
    out = tmp_path_factory.mktemp("digits")
    res = {}
    for name, make, images in (("mlp", dm.make_mlp, False), ("cnn", dm.make_cnn, True)):
        x_tr, y_tr, x_te, y_te = dm.load_data(seed=0, images=images)
        model = make(seed=0)
        dm.train(model, (x_tr[:384], y_tr[:384]), epochs=1, seed=0, verbose=False)
        path = dm.export(model, x_te[:1], out / f"digits_{name}.onnx")
        res[name] = (model, x_te[:16], path)
    return res


def test_load_data(dm):
    x_tr, y_tr, x_te, y_te = dm.load_data(seed=0)
    assert x_tr.dtype == np.float32 and x_te.dtype == np.float32
    assert x_tr.shape[1:] == (64,) and x_tr.shape[0] + x_te.shape[0] == 1797
    assert abs(x_te.shape[0] / 1797 - 0.25) < 0.01
    assert set(np.unique(y_te)) == set(range(10))
    k = np.concatenate([x_tr, x_te]) * 16
    assert np.array_equal(k, np.round(k)) and k.min() == 0 and k.max() == 16  # pixels are k/16
    xi = dm.load_data(seed=0, images=True)[0]
    assert xi.shape[1:] == (1, 8, 8) and np.array_equal(xi.reshape(-1, 64), x_tr)
    # fixed split: same seed, same data
    assert np.array_equal(dm.load_data(seed=0)[3], y_te)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_quant_scales_power_of_two(dm, trained, name):
    import onnx

    _, _, path = trained[name]
    qs = dm.quant_scales(path)
    assert len(qs) >= 7
    for q in qs:
        assert q["op"] == "Quant"
        assert dm.is_power_of_two(q["scale"]), (q["name"], q["scale"])
        assert np.all(np.asarray(q["zeropt"]) == 0), q["name"]
    # the input quantizer: unsigned, scale 2**-4
    first = [q for q in qs if not q["const_input"]][0]
    assert float(np.ravel(first["scale"])[0]) == 2.0 ** -4 and first["signed"] == 0

    # every Conv/Gemm has quantized weights and a quantized bias with scale = s_in * s_w
    g = onnx.load(str(path)).graph
    producer = {o: n for n in g.node for o in n.output}
    by_node = {q["name"]: q for q in qs}
    ops = [n.op_type for n in g.node]
    assert set(ops) <= {"Quant", "Conv", "Gemm", "MatMul", "Relu", "MaxPool", "AveragePool",
                        "GlobalAveragePool", "Flatten", "Reshape", "Add", "Concat"}, ops

    def act_scale(t):  # walk back through scale-preserving ops to the activation Quant
        n = producer[t]
        while n.op_type in ("MaxPool", "Reshape", "Flatten"):
            n = producer[n.input[0]]
        assert n.op_type == "Quant"
        return float(np.ravel(by_node[n.name]["scale"])[0])

    layers = [n for n in g.node if n.op_type in ("Conv", "Gemm")]
    assert len(layers) == 3
    for n in layers:
        assert len(n.input) == 3
        wq, bq = by_node[producer[n.input[1]].name], by_node[producer[n.input[2]].name]
        assert wq["const_input"] and bq["const_input"]
        assert wq["signed"] == 1 and wq["narrow"] == 1 and float(wq["bitwidth"]) == 6
        assert bq["signed"] == 1 and float(bq["bitwidth"]) == 16
        s_b = float(np.ravel(bq["scale"])[0])
        assert s_b == act_scale(n.input[0]) * float(np.ravel(wq["scale"])[0])


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_qonnx_matches_brevitas(dm, trained, name):
    model, x, path = trained[name]
    ref = dm.predict(model, x)
    got = dm.qonnx_forward(path, x)
    assert got.shape == (x.shape[0], 10)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    # logits are exact multiples of the last layer's accumulator scale (a power of two)
    qs = dm.quant_scales(path)
    s_acc = min(float(np.ravel(q["scale"])[0]) for q in qs if float(np.ravel(q["bitwidth"])[0]) == 16)
    assert math.log2(s_acc) == int(math.log2(s_acc))
    k = ref.astype(np.float64) / s_acc
    assert np.array_equal(k, np.round(k))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_qdeploy_import_matches_brevitas(dm, trained, name):
    from qdeploy.compiler import reference
    from qdeploy.compiler.frontends.qonnx import import_onnx

    model, x, path = trained[name]
    g = import_onnx(str(path))
    (perm,) = g.meta["input_perms"].values()
    out = np.asarray(reference.run(g, np.transpose(x, perm)))
    np.testing.assert_array_equal(out, dm.predict(model, x).astype(out.dtype))
