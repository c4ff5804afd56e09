"""The thin ``predict`` path (runtime/predictor.py + backends/tvm/fastcall.py) changes nothing but
the time: every result equals an independent oracle (qonnx's executor, or a NumPy computation of
the graph) and the general path's (a ``reference``-target artifact of the same model), errors are
the general path's, reused input buffers never leak into returned arrays, and concurrent callers
get their own results."""
from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest

import qdeploy
from qdeploy.compiler.errors import QDeployError
from qdeploy.compiler.ir import Const, GraphBuilder, parse_type
from qdeploy.compiler.ir.types import FLOAT32
from qdeploy.runtime import CompiledModel

from .test_layout import conv_model, run_qonnx

pytest.importorskip("tvm")
warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    """NCHW conv model with C == H == W and two outputs, as a TVM and a reference artifact."""
    d = tmp_path_factory.mktemp("thin")
    model = conv_model((1, 4, 4, 4), two_outputs=True)
    path = d / "m.onnx"
    path.write_bytes(model.SerializeToString())
    x = (np.random.default_rng(0).integers(-64, 64, (8, 4, 4, 4)) / 16).astype(np.float32)
    qdeploy.compile(str(path), "tvm-llvm", d / "tvm", golden=x)
    qdeploy.compile(str(path), "reference", d / "ref", golden=x)
    return model, x, CompiledModel.load(d / "tvm"), CompiledModel.load(d / "ref")


def test_thin_path_is_taken_and_matches_qonnx(square):
    model, x, m, ref = square
    assert m.predictor.thin and not ref.predictor.thin
    assert m.manifest["backend"]["batch1_entry"]  # the static batch-1 entry is built by default
    for xb in (x[:1], x, x[3]):  # batch 1 (main_b1), batch 8 (main), one sample without the batch axis
        got = m.predict(xb)
        want = run_qonnx(model, xb if xb.ndim == 4 else xb[None])
        general = ref.predict(xb)
        for g, w, r in zip(got, want, general):
            assert g.dtype == r.dtype == np.float64 and g.shape == r.shape == w.shape
            assert np.array_equal(g, w) and np.array_equal(g, r)


def test_fresh_arrays_beyond_the_buffer_limit(square, monkeypatch):
    """Batches over ``BUFFER_LIMIT_BYTES`` (here: every batch) get fresh input arrays each call."""
    from qdeploy.runtime import predictor

    _, x, m, ref = square
    monkeypatch.setattr(predictor, "BUFFER_LIMIT_BYTES", 0)
    for xb in (x[:1], x):
        assert all(np.array_equal(g, w) for g, w in zip(m.predict(xb), ref.predict(xb)))
    with pytest.raises(ValueError, match="no bare library call"):
        ref.predictor.raw_call(x)


def test_channels_last_dict_and_list_inputs(square):
    _, x, m, ref = square
    xcl = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    for args, kw in (((xcl,), {"layout": "NHWC"}), (({"x": xcl},), {"layout": "channels-last"}),
                     (([xcl],), {"layout": "NHWC"}), ((x.astype(np.float64),), {})):
        got, want = m.predict(*args, **kw), ref.predict(*args, **kw)
        assert all(np.array_equal(g, w) for g, w in zip(got, want))
    # channels-last outputs are the source outputs transposed
    src = m.predict(x)
    assert np.array_equal(m.predict(xcl, layout="NHWC")[0], src[0].transpose(0, 2, 3, 1))


def test_errors_are_the_general_paths(square):
    _, x, m, ref = square
    for bad in (x[:, :3], x.transpose(0, 2, 3, 1)[:, :, :, :3], np.zeros((2, 4, 4))):
        with pytest.raises(QDeployError) as e1:
            m.predict(bad)
        with pytest.raises(QDeployError) as e2:
            ref.predict(bad)
        assert str(e1.value) == str(e2.value) and "in NCHW" in str(e1.value)
    with pytest.raises(QDeployError, match="input 'x'"):
        m.predict(x, layout="NCWH")
    with pytest.raises(QDeployError, match="takes 1 input"):
        m.predict(x, x)
    nan = x[:2].copy()
    nan[1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):  # the library quantizes this float input
        m.predict(nan)


def test_returned_arrays_do_not_share_the_reused_buffers(square):
    _, x, m, _ = square
    first = m.predict(x[:1])
    keep = [a.copy() for a in first]
    m.predict(x[1:2])
    m.predict(x[:2])
    assert all(np.array_equal(a, k) for a, k in zip(first, keep))


def test_an_output_that_is_a_view_of_the_input_is_copied(tmp_path):
    """Relax lowers Reshape to a view: the library may hand back the input buffer itself."""
    b = GraphBuilder("alias")
    xi = b.input("x", (4,), FLOAT32)
    b.output(b.add("r", "Reshape", [xi], attrs={"shape": (2, 2)}))
    g = b.build()
    qdeploy.compile(g, "tvm-llvm", tmp_path / "a", golden=np.zeros((1, 4), np.float32))
    m = CompiledModel.load(tmp_path / "a")
    x1 = np.arange(4, dtype=np.float32)[None]
    y1 = m.predict(x1)
    m.predict(x1 + 10)
    assert np.array_equal(y1, x1.reshape(1, 2, 2))


@pytest.mark.parametrize("w_type,w_max,host", [("fixed<6,1>", 32, []), ("fixed<18,1>", 1 << 17, ["sm"])])
def test_softmax_and_mixed_outputs_match_numpy(tmp_path, w_type, w_max, host):
    """A fixed-point input quantized on the host, a Dense, a float Softmax next to a fixed-point
    output taken from the library: checked against NumPy.  With narrow logits (< 24 bits, a small
    exp table) the Softmax runs in the library (backends/tvm/softmax_lut.py); with 30-bit logits it
    runs on the host (the epilogue).  Either way the result is NumPy's softmax bit for bit."""
    rng = np.random.default_rng(1)
    t_in, t_w = parse_type("fixed<8,3,RND_CONV,SAT>"), parse_type(w_type)
    w = rng.integers(-w_max, w_max, (6, 5))
    b = GraphBuilder("epi")
    xi = b.input("x", (6,), t_in)
    d = b.add("d", "Dense", [xi], params={"weight": Const(w, t_w)})
    b.output(b.add("sm", "Softmax", [d]), d)
    g = b.build()
    x = (rng.integers(-200, 200, (7, 6)) / 37).astype(np.float32)  # off the grid: rounded on the host
    qdeploy.compile(g, "tvm-llvm", tmp_path / "e", golden=x)
    m = CompiledModel.load(tmp_path / "e")
    assert m.manifest["backend"]["host_nodes"] == host
    # oracle: round half to even onto the 2**-5 grid (ap_fixed<8,3>), saturate, exact integer dot product
    codes = np.clip(np.round(x.astype(np.float64) * 32), -128, 127).astype(np.int64)
    acc = codes @ w  # fraction bits 5 + frac(w)
    logits = acc / 2.0 ** (5 + t_w.frac_bits)
    z = logits.astype(np.float32)
    e = np.exp(z - z.max(-1, keepdims=True))
    want = e / e.sum(-1, keepdims=True)
    for xb, sl in ((x, slice(None)), (x[2:3], slice(2, 3))):
        sm, dense = m.predict(xb)
        assert np.array_equal(dense, logits[sl])
        assert sm.dtype == np.float32 and np.array_equal(sm, want[sl])
        lib = m.predictor.raw_call(xb)()  # the bare library call: the Dense codes (and the Softmax)
        assert np.array_equal(lib[-1].numpy(), acc[sl])


def test_concurrent_callers_get_their_own_results(square):
    _, x, m, ref = square
    want = [ref.predict(x[i:i + 1]) for i in range(len(x))]
    bad = []

    def work(k):
        for r in range(40):
            i = (k + r) % len(x)
            got = m.predict(x[i:i + 1])
            if not all(np.array_equal(g, w) for g, w in zip(got, want[i])):
                bad.append(i)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


def test_single_io_batch1_path(tmp_path):
    """One input, one output: the batch-1 path (``Predictor._one``) is taken and equals qonnx's
    executor and the general path for a batch of one and for one sample without the batch axis,
    with the NCHW -> NHWC transpose on the way in and back; NaN is refused as by the general path;
    larger batches and channels-last inputs take the other paths with the same results."""
    d = tmp_path
    model = conv_model((1, 4, 4, 4))
    path = d / "m.onnx"
    path.write_bytes(model.SerializeToString())
    x = (np.random.default_rng(3).integers(-64, 64, (5, 4, 4, 4)) / 16).astype(np.float32)
    qdeploy.compile(str(path), "tvm-llvm", d / "tvm", golden=x)
    qdeploy.compile(str(path), "reference", d / "ref", golden=x)
    m, ref = CompiledModel.load(d / "tvm"), CompiledModel.load(d / "ref")
    assert m.predictor._one is not None
    for xb in (x[:1], x[2], x, x[1:2].astype(np.float64)):
        got = m.predict(xb)
        assert got.shape == ref.predict(xb).shape and np.array_equal(got, ref.predict(xb))
        assert np.array_equal(got, run_qonnx(model, xb if xb.ndim == 4 else xb[None])[0])
    xcl = np.ascontiguousarray(x[:1].transpose(0, 2, 3, 1))
    assert np.array_equal(m.predict(xcl, layout="NHWC"), ref.predict(xcl, layout="NHWC"))
    nan = x[:1].copy()
    nan[0, 1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        m.predict(nan)
    first = m.predict(x[:1])
    keep = first.copy()
    m.predict(x[1:2])
    assert np.array_equal(first, keep)  # the returned array is not the reused buffer


def test_single_io_with_host_softmax_chain(tmp_path):
    """A float input quantized in the library, Dense, then an Affine -> Softmax chain on the host:
    the batch-1 path's result equals the reference interpreter's, bit for bit."""
    from qdeploy.compiler import reference as refi

    rng = np.random.default_rng(2)
    b = GraphBuilder("chain")
    xi = b.input("x", (6,), FLOAT32)
    q = b.add("q", "Quantize", [xi], attrs={"to": parse_type("fixed<8,3,RND_CONV,SAT>")})
    d = b.add("d", "Dense", [q], params={"weight": Const(rng.integers(-32, 32, (6, 5)), parse_type("fixed<6,1>"))})
    a = b.add("s", "Affine", [d], params={"scale": Const(np.float32([0.37]), FLOAT32)})
    b.output(b.add("sm", "Softmax", [a]))
    g = b.build()
    x = rng.normal(0, 2, (9, 6)).astype(np.float32)
    qdeploy.compile(g, "tvm-llvm", tmp_path / "c", golden=x)
    m = CompiledModel.load(tmp_path / "c")
    assert m.manifest["backend"]["host_nodes"] == ["s", "sm"] and m.predictor._one is not None
    want = refi.execute(g, {"x": x})[g.outputs[0]]
    for i in range(len(x)):
        got = m.predict(x[i:i + 1])
        assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want[i:i + 1].view(np.uint32))
    assert np.array_equal(m.predict(x), want)
    nan = x[:1].copy()
    nan[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        m.predict(nan)
