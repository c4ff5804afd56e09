"""hls4ml's ``distributed_arithmetic`` strategy (da4ml): what is refused (one line naming the option
or node), the DA estimate rule (da4ml's cost of the same adder graph hls4ml builds), and -- slow --
a bit-exact compile of the jet tagger whose per-layer cost equals what hls4ml's own DA pass recorded."""
from __future__ import annotations

import json

import numpy as np
import pytest

from qdeploy.backends.hls4ml.da import check_da, input_kif, solve
from qdeploy.backends.hls4ml.estimate import estimate
from qdeploy.compiler.errors import QDeployError, UnsupportedError
from qdeploy.compiler.ir import Const, GraphBuilder
from qdeploy.compiler.ir.types import FixedType
from tests.conftest import REALCASES, needs_realcases

pytest.importorskip("da4ml")

JSC = REALCASES / "jsc-qkeras-3layer" / "qkeras_jettagging.onnx"
DA = {"strategy": "distributed_arithmetic"}


def mlp(seed=0, n_in=12, n_out=6, bits=6):
    rng = np.random.default_rng(seed)
    t = FixedType(bits, 2)
    b = GraphBuilder("m")
    x = b.input("x", (n_in,), FixedType(8, 3))
    y = b.add("fc", "Dense", [x], params={"weight": Const(rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), (n_in, n_out)), t),
                                            "bias": Const(rng.integers(-64, 64, (n_out,)), FixedType(10, 4))})
    b.output(b.add("relu", "Relu", [y]))
    return b.build()


def conv(seed=0):
    rng = np.random.default_rng(seed)
    t = FixedType(6, 2)
    b = GraphBuilder("c")
    x = b.input("x", (6, 6, 2), t)
    b.output(b.add("conv", "Conv", [x], attrs={"kernel": (3, 3)},
                   params={"weight": Const(rng.integers(-32, 32, (3, 3, 2, 4)), t)}))
    return b.build()


@pytest.mark.slow  # da4ml's numba JIT: ~2 min cold on CI
def test_the_solved_adder_graph_is_the_layers_product():
    """The da4ml solution that is priced (and that hls4ml writes as C++) computes x @ W + b exactly: an
    independent NumPy integer product on random and extreme input codes of the layer's input type."""
    g = mlp()
    node = g.node("fc")
    sol = solve(g, node)
    xt = g.value("x").dtype
    assert input_kif(xt) == (1, 2, 5)  # ap_fixed<8,3>: sign, 2 integer bits, 5 fraction bits
    rng = np.random.default_rng(1)
    lo, hi = -(1 << (xt.width - 1)), (1 << (xt.width - 1)) - 1
    codes = np.concatenate([rng.integers(lo, hi + 1, (40, 12)), np.full((1, 12), lo), np.full((1, 12), hi)])
    w, b = node.params["weight"], node.params["bias"]
    want = (codes @ w.data) * 2.0 ** -(xt.frac_bits + w.dtype.frac_bits) + b.data * 2.0 ** -b.dtype.frac_bits
    got = np.array([sol(list(c * 2.0 ** -xt.frac_bits)) for c in codes], dtype=np.float64)
    np.testing.assert_array_equal(got, want)
    assert sol.cost > 0


@pytest.mark.slow  # da4ml's numba JIT: ~2 min cold on CI
def test_da_estimate_prices_dense_layers_with_da4mls_cost_and_no_dsp():
    g = mlp(bits=8)
    lat, da = estimate(g, {"strategy": "Latency"}), estimate(g, DA)
    r = next(x for x in da["layers"] if x["name"] == "fc")
    assert r["dsp"] == 0 and r["lut"] == round(solve(g, g.node("fc")).cost) and r["detail"]["strategy"] == "distributed_arithmetic"
    assert da["total"]["dsp"] == 0 and da["config"]["strategy"] == "distributed_arithmetic"
    relu_l = next(x for x in lat["layers"] if x["name"] == "relu")
    assert next(x for x in da["layers"] if x["name"] == "relu")["lut"] == relu_l["lut"]  # other layers: the base rule
    assert da["total"]["lut"] == sum(x["lut"] for x in da["layers"])


@pytest.mark.parametrize("cfg, where", [
    ({"io_type": "io_stream"}, "hls4ml.io_type"),
    ({"reuse_factor": 2}, "fc"),
])
def test_da_estimate_refuses_what_is_not_built(cfg, where):
    with pytest.raises(UnsupportedError) as e:
        estimate(mlp(), {**DA, **cfg})
    assert where in e.value.one_line()


def test_da_refuses_conv_catapult_and_reuse_factors_naming_the_layer():
    g = conv()
    with pytest.raises(UnsupportedError) as e:
        check_da(g, "Vitis", "io_parallel", {})
    assert "conv" in e.value.one_line() and "Latency" in e.value.one_line()
    with pytest.raises(UnsupportedError) as e:
        check_da(mlp(), "Catapult", "io_parallel", {})
    assert "Catapult" in e.value.one_line()
    with pytest.raises(UnsupportedError) as e:
        check_da(mlp(), "Vitis", "io_parallel", {"fc": {"requested": 4, "used": 4}})
    assert "fc" in e.value.one_line() and "reuse factor 1" in e.value.one_line()
    check_da(mlp(), "Vivado", "io_parallel", {"fc": {"requested": 1, "used": 1}})  # accepted


def test_compile_refuses_da_on_catapult_before_writing(tmp_path):
    import qdeploy
    with pytest.raises(QDeployError) as e:
        qdeploy.compile(mlp(), "hls4ml", tmp_path / "a", golden=None,
                        config={"hls4ml": {**DA, "backend": "Catapult"}}, source_check=False)
    assert "Catapult" in str(e.value) and not (tmp_path / "a").exists()


@pytest.mark.slow
@needs_realcases
def test_jet_tagger_compiles_bit_exact_with_distributed_arithmetic(tmp_path):
    """The jet tagger with every Dense built by da4ml: C simulation == reference == the QONNX source on
    the 64 golden rows; report.md names the strategy per layer; the estimate's LUTs per Dense are the
    cost hls4ml's own DA pass recorded for the layer it wrote (``da_kernel_cost``)."""
    import qdeploy
    x = np.load(REALCASES / "jsc-qkeras-3layer" / "synthetic_input_uniform_pm1_64x16.npy").astype(np.float32)
    res = qdeploy.compile(str(JSC), "hls4ml", tmp_path / "a", golden=x, config={"hls4ml": DA})
    rep = res.report
    assert rep["exactness"]["bit_exact"] and rep["exactness"]["samples"] == 64
    assert rep["fidelity"]["ok"] and rep["fidelity"]["real_mismatches"] == 0
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())["backend"]
    costs = {lay["name"]: lay["da_kernel_cost"] for lay in man["layers"] if "da_kernel_cost" in lay}
    assert len(costs) == 4 and all(lay["strategy"] == "distributed_arithmetic" for lay in man["layers"]
                                   if lay["name"] in costs)
    rows = {r["name"]: r for r in rep["estimate"]["layers"]}
    for node, layers in man["node_layers"].items():
        if rows[node]["op"] == "Dense":
            assert rows[node]["lut"] == round(costs[layers[0]]) and rows[node]["dsp"] == 0
    md = (tmp_path / "a" / "report.md").read_text()
    table = md.split("## hls4ml project", 1)[1]
    dense = [ln for ln in table.splitlines() if ln.startswith("| MatMul_")]
    assert len(dense) == 4 and all("| distributed_arithmetic |" in ln for ln in dense), dense
    code = (tmp_path / "a" / "hls4ml_prj" / "firmware" / "nnet_utils" / "nnet_code_gen.h").read_text()
    assert "dense_da_" in code and " * " not in code.split("dense_da_", 1)[1]  # multiplier-free
