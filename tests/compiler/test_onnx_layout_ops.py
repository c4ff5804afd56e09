"""ONNX import of the data-movement ops of batch B (Resize/Upsample, DepthToSpace/SpaceToDepth):
tiny QONNX models (power-of-two ``Quant`` nodes around the op) whose IR reference output must equal
qonnx's ``execute_onnx`` exactly, the QONNX export round trip, and the refusals (naming the node)
of every variant that is not an exact permutation/repetition."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from qdeploy.compiler.errors import UnsupportedError, VerifyError
from qdeploy.compiler.frontends import export_qonnx, import_onnx
from qdeploy.compiler.ir import verify
from qdeploy.compiler.ir.ops.resize import onnx_nearest_index
from tests.compiler.test_frontends import f32, mk, ops, quant_node, run_ir, run_qonnx


def _grid(rng, shape):
    """Inputs on the 2**-5 grid, some beyond the 8-bit range (the input Quant saturates them)."""
    return f32(rng.integers(-200, 200, size=shape) / 32.0)


def _between_quants(op_node, in_shape, inits=None, opset=13):
    """x -> Quant(2**-4, 8 bit) -> op -> Quant(2**-3, 6 bit) -> y."""
    q1, i1 = quant_node("qin", "x", "a", 2.0 ** -4, 8)
    q2, i2 = quant_node("qout", "b", "y", 2.0 ** -3, 6)
    return mk([q1, op_node, q2], in_shape, {**i1, **i2, **(inits or {})}, opset=opset)


def _exact(model, x, op):
    g = import_onnx(model)
    verify(g)
    assert op in ops(g)
    want = run_qonnx(model, x)
    got = run_ir(g, x)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    return g


def _refused(model) -> str:
    with pytest.raises(UnsupportedError) as ei:
        import_onnx(model)
    return str(ei.value)


# ------------------------------------------------------------------------------ Resize
def _resize(ctm="asymmetric", nm="floor", scales=(1, 1, 2, 3), sizes=None, mode="nearest"):
    inits = {}
    ins = ["a", ""]
    if sizes is None:
        inits["sc"] = f32(scales)
        ins.append("sc")
    else:
        inits["sz"] = np.asarray(sizes, dtype=np.int64)
        ins += ["", "sz"]
    node = helper.make_node("Resize", ins, ["b"], name="rs", mode=mode, coordinate_transformation_mode=ctm,
                            nearest_mode=nm)
    return node, inits


@pytest.mark.parametrize("ctm,nm,scales", [("asymmetric", "floor", (1, 1, 2, 3)),
                                           ("half_pixel", "round_prefer_floor", (1, 1, 3, 2)),
                                           ("pytorch_half_pixel", "round_prefer_ceil", (1, 1, 2, 2)),
                                           ("tf_half_pixel_for_nn", "floor", (1, 1, 1, 3)),
                                           ("asymmetric", "round_prefer_floor", (1, 1, 2, 2))])
def test_resize_scales_empty_roi_matches_qonnx(rng, tmp_path, ctm, nm, scales):
    node, inits = _resize(ctm, nm, scales)
    m = _between_quants(node, [2, 3, 3, 4], inits)
    x = _grid(rng, (2, 3, 3, 4))
    g = _exact(m, x, "Resize")
    rs = next(n for n in g.nodes if n.op == "Resize")
    assert tuple(rs.attrs["scales"]) == tuple(scales[2:])
    exported = export_qonnx(g, tmp_path / "resize.onnx")
    got = np.concatenate([run_qonnx(exported, x[i:i + 1]) for i in range(len(x))])
    np.testing.assert_array_equal(got, run_qonnx(m, x))


def test_resize_sizes_input_matches_qonnx(rng):
    node, inits = _resize("half_pixel", "round_prefer_floor", sizes=(1, 3, 9, 8))
    m = _between_quants(node, [1, 3, 3, 4], inits)
    _exact(m, _grid(rng, (1, 3, 3, 4)), "Resize")
    node, inits = _resize("half_pixel", "round_prefer_floor", sizes=(2, 3, 9, 8))
    msg = _refused(_between_quants(node, [2, 3, 3, 4], inits))
    assert "node 'rs'" in msg and "batch" in msg


def test_resize_1d_matches_qonnx(rng):
    node, inits = _resize("asymmetric", "floor", (1, 1, 4))
    m = _between_quants(node, [3, 2, 5], inits)
    _exact(m, _grid(rng, (3, 2, 5)), "Resize")


def test_upsample_opset9_matches_qonnx(rng):
    node = helper.make_node("Upsample", ["a", "sc"], ["b"], name="up", mode="nearest")
    m = _between_quants(node, [2, 2, 3, 3], {"sc": f32([1, 1, 3, 2])}, opset=9)
    _exact(m, _grid(rng, (2, 2, 3, 3)), "Resize")


@pytest.mark.parametrize("ctm,nm,scales,why", [
    ("asymmetric", "round_prefer_floor", (1, 1, 3, 1), "not a repetition"),
    ("half_pixel", "floor", (1, 1, 2, 2), "not a repetition"),
    ("align_corners", "round_prefer_floor", (1, 1, 3, 3), "not a repetition"),
    ("tf_crop_and_resize", "floor", (1, 1, 2, 2), "tf_crop_and_resize"),
    ("asymmetric", "floor", (1, 1, 1.5, 2), "not positive integers"),
    ("asymmetric", "floor", (1, 1, 0.5, 1), "not positive integers"),
    ("asymmetric", "floor", (1, 2, 2, 2), "channel axis"),
])
def test_resize_inexact_variants_are_refused_naming_the_node(ctm, nm, scales, why):
    node, inits = _resize(ctm, nm, scales)
    msg = _refused(_between_quants(node, [1, 2, 4, 4], inits))
    assert "node 'rs'" in msg and why in msg, msg


def test_resize_linear_mode_is_refused():
    node, inits = _resize(mode="linear")
    msg = _refused(_between_quants(node, [1, 2, 4, 4], inits))
    assert "node 'rs'" in msg and "'linear'" in msg


def test_onnx_nearest_index_against_brute_force_floats():
    """The exact rational evaluation agrees with a float64 evaluation of the ONNX formulas away
    from ties (an independent check of the transcription)."""
    import math
    for s in (2, 3, 5):
        for L in (1, 4, 7):
            for o in range(s * L):
                x = (o + 0.5) / s - 0.5
                r = x - math.floor(x)
                if abs(r - 0.5) > 1e-9:
                    want = min(max(math.floor(x + 0.5), 0), L - 1)
                    assert onnx_nearest_index(o, s, L, "half_pixel", "round_prefer_floor") == want
                assert onnx_nearest_index(o, s, L, "asymmetric", "floor") == min(o // s, L - 1)


def test_torch_upsample_export_imports_as_exact_repetition(rng):
    """PyTorch ``nn.Upsample(scale_factor=2, mode='nearest')`` (exported Resize: asymmetric +
    floor) imports as ``Resize`` and equals the module itself."""
    import io

    import torch

    mod = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2, mode="nearest")).eval()
    buf = io.BytesIO()
    torch.onnx.export(mod, torch.zeros(1, 3, 4, 5), buf, dynamo=False, opset_version=13)
    g = import_onnx(buf.getvalue())
    assert ops(g) == ["Resize"]
    x = f32(rng.normal(size=(1, 3, 4, 5)))
    with torch.no_grad():
        want = mod(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(run_ir(g, x), want)


# ------------------------------------------------------------------------------ DepthToSpace
@pytest.mark.parametrize("op,attrs,shape", [("DepthToSpace", {"blocksize": 2, "mode": "DCR"}, [2, 8, 2, 3]),
                                            ("DepthToSpace", {"blocksize": 2, "mode": "CRD"}, [2, 8, 2, 3]),
                                            ("DepthToSpace", {"blocksize": 2}, [2, 12, 3, 2]),
                                            ("SpaceToDepth", {"blocksize": 2}, [2, 3, 4, 6])])
def test_depth_space_matches_qonnx(rng, tmp_path, op, attrs, shape):
    node = helper.make_node(op, ["a"], ["b"], name="ds", **attrs)
    m = _between_quants(node, shape)
    x = _grid(rng, tuple(shape))
    g = _exact(m, x, op)
    d = next(n for n in g.nodes if n.op == op)
    assert d.attrs["block"] == 2 and d.attrs.get("mode", "DCR") == attrs.get("mode", "DCR")
    exported = export_qonnx(g, tmp_path / "ds.onnx")
    got = np.concatenate([run_qonnx(exported, x[i:i + 1]) for i in range(len(x))])
    np.testing.assert_array_equal(got, run_qonnx(m, x))


def test_depth_to_space_bad_channels_refused_naming_the_node():
    node = helper.make_node("DepthToSpace", ["a"], ["b"], name="ds", blocksize=2)
    with pytest.raises(VerifyError) as ei:
        import_onnx(_between_quants(node, [1, 6, 2, 2]))
    assert "node 'ds'" in str(ei.value) and "not a multiple of block**2" in str(ei.value)


def test_torch_pixel_shuffle_export_is_exact(rng):
    """PyTorch ``nn.PixelShuffle(2)`` (CRD order) and ``nn.PixelUnshuffle(2)`` import and equal the
    modules themselves."""
    import io

    import torch

    for mod, shape in ((torch.nn.PixelShuffle(2), (1, 8, 3, 2)), (torch.nn.PixelUnshuffle(2), (1, 2, 4, 6))):
        buf = io.BytesIO()
        torch.onnx.export(torch.nn.Sequential(mod).eval(), torch.zeros(*shape), buf, dynamo=False, opset_version=13)
        g = import_onnx(buf.getvalue())
        x = f32(rng.normal(size=shape))
        with torch.no_grad():
            want = mod(torch.from_numpy(x)).numpy()
        np.testing.assert_array_equal(run_ir(g, x), want)
        if isinstance(mod, torch.nn.PixelShuffle):  # exported as one DepthToSpace(mode=CRD)
            assert [(n.op, n.attrs["mode"]) for n in g.nodes] == [("DepthToSpace", "CRD")]


# ------------------------------------------------------------------------------ Sigmoid / Tanh tables
@pytest.mark.parametrize("fn,out_signed", [("Sigmoid", 0), ("Tanh", 1)])
def test_sigmoid_tanh_on_codes_match_qonnx_exactly(tmp_path, fn, out_signed):
    """Quant(8 bit, 2**-4) -> Sigmoid/Tanh -> Quant(8 bit, 2**-7): the IR ``Lookup`` holds the
    source's own float32 value for each of the 256 input codes; every code (and every rounding
    tie the output Quant meets) equals qonnx's executor, and so does the export."""
    q1, i1 = quant_node("qin", "x", "a", 2.0 ** -4, 8)
    q2, i2 = quant_node("qout", "b", "y", 2.0 ** -7, 8, signed=out_signed)
    m = mk([q1, helper.make_node(fn, ["a"], ["b"], name="act"), q2], [256, 1], {**i1, **i2})
    x = f32(np.arange(-128, 128).reshape(256, 1) / 16.0)  # every input code once
    g = _exact(m, x, "Lookup")
    lk = next(n for n in g.nodes if n.op == "Lookup")
    assert lk.attrs["fn"] == fn and lk.params["table"].shape == (256,)
    exported = export_qonnx(g, tmp_path / "act.onnx", batch=len(x))
    np.testing.assert_array_equal(run_qonnx(exported, x), run_qonnx(m, x))


def test_sigmoid_on_a_float_input_is_refused_naming_the_node():
    q2, i2 = quant_node("qout", "b", "y", 2.0 ** -7, 8, signed=0)
    m = mk([helper.make_node("Sigmoid", ["x"], ["b"], name="sig"), q2], [2, 4], i2)
    msg = _refused(m)
    assert "node 'sig'" in msg and "float input" in msg


def test_compile_end_to_end_matches_the_source_on_tvm(tmp_path):
    """Quant -> Resize -> DepthToSpace(CRD) -> Sigmoid -> Quant through ``qdeploy.compile`` for
    tvm-llvm: the target equals the reference and the reference equals the source (qonnx's
    executor) on every golden sample."""
    from qdeploy import api

    q1, i1 = quant_node("qin", "x", "a", 2.0 ** -4, 6)
    q2, i2 = quant_node("qout", "d", "y", 2.0 ** -6, 7, signed=0)
    nodes = [q1, helper.make_node("Resize", ["a", "", "sc"], ["b"], name="rs", mode="nearest",
                                  coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
             helper.make_node("DepthToSpace", ["b"], ["c"], name="d2s", blocksize=2, mode="CRD"),
             helper.make_node("Sigmoid", ["c"], ["d"], name="sig"), q2]
    m = mk(nodes, [1, 8, 3, 2], {**i1, **i2, "sc": f32([1, 1, 2, 2])})
    x = _grid(np.random.default_rng(3), (12, 8, 3, 2))
    r = api.compile(m, target="tvm-llvm", out_dir=tmp_path / "out", golden=x)
    assert r.report["exactness"]["bit_exact"] and r.report["exactness"]["samples"] == 12
    fid = r.report["fidelity"]
    assert fid["ok"] and fid["checked"] and fid["mismatches"] == 0 and fid["exact_matches"] == 12


def test_sigmoid_compiles_for_hls4ml_as_its_table_activation(tmp_path):
    """Quant(8 bit, 2**-5) -> Sigmoid -> Quant(7 bit unsigned, 2**-7) through ``qdeploy.compile`` for
    hls4ml: the pipeline folds the table and its Quant (fold_lookup_quantize), the firmware uses
    hls4ml's sigmoid table, and every input code equals the source."""
    from qdeploy import api

    q1, i1 = quant_node("qin", "x", "a", 2.0 ** -5, 8)
    q2, i2 = quant_node("qout", "b", "y", 2.0 ** -7, 7, signed=0)
    m = mk([q1, helper.make_node("Sigmoid", ["a"], ["b"], name="sig"), q2], [1, 256], {**i1, **i2})
    x = f32(np.arange(-128, 128).reshape(1, 256) / 32.0)
    r = api.compile(m, target="hls4ml", out_dir=tmp_path / "out", golden=x)
    assert r.report["exactness"]["bit_exact"] and r.report["fidelity"]["mismatches"] == 0
    assert r.report["fidelity"]["checked"]
    fold = [p for p in r.report["passes"] if p["name"] == "fold_lookup_quantize"]
    assert fold and any("folded Quantize" in s for s in fold[0]["notes"])
    import json
    backend_notes = json.loads((tmp_path / "out" / "manifest.json").read_text())["backend"]["notes"]
    assert any("sigmoid table" in s for s in backend_notes), backend_notes


# ------------------------------------------------------------------------------ broadcast Mul (hls4ml)
@pytest.mark.parametrize("io_type", ["io_parallel", "io_stream"])
def test_squeeze_excitation_mul_compiles_for_hls4ml(tmp_path, io_type):
    """x * Quant(Relu(GlobalAveragePool(x))): an [H, W, C] x [1, 1, C] Mul, which hls4ml's Merge
    cannot broadcast, compiles (the gate is repeated by an exact Resize) and equals the source."""
    from qdeploy import api

    q1, i1 = quant_node("qin", "x", "a", 2.0 ** -4, 8)
    q2, i2 = quant_node("qg", "g", "gq", 2.0 ** -4, 5, signed=0)
    q3, i3 = quant_node("qout", "m", "y", 2.0 ** -4, 8)
    nodes = [q1, helper.make_node("GlobalAveragePool", ["a"], ["g0"], name="gap"),
             helper.make_node("Relu", ["g0"], ["g"], name="relu"), q2,
             helper.make_node("Mul", ["a", "gq"], ["m"], name="se_mul"), q3]
    m = mk(nodes, [1, 3, 4, 4], {**i1, **i2, **i3})
    x = _grid(np.random.default_rng(4), (10, 3, 4, 4))
    r = api.compile(m, target="hls4ml", out_dir=tmp_path / "out", golden=x, config={"hls4ml": {"io_type": io_type}})
    assert r.report["exactness"]["bit_exact"] and r.report["exactness"]["samples"] == 10
    assert r.report["fidelity"]["checked"] and r.report["fidelity"]["mismatches"] == 0
