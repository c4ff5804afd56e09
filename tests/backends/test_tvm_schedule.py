"""``tvm.schedule: "auto"`` (backends/tvm/schedule.py): the fixed CPU loop schedule must keep
fixed-point graphs bit-exact (same accumulation order per output element), keep float graphs
within float rounding of the unscheduled build, really transform the loops (vectorized
reductions), and reject unknown schedule names."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from qdeploy.backends.tvm import TvmBackend  # noqa: E402
from qdeploy.backends.tvm.lower import lower  # noqa: E402
from qdeploy.backends.tvm.schedule import schedule_cpu  # noqa: E402
from qdeploy.compiler import reference as ref  # noqa: E402
from qdeploy.compiler.errors import CompileError  # noqa: E402

from .test_tvm import _arith_graph, _assert_exact, _conv_graph, _feeds, _float_graph  # noqa: E402


def _build(graph, out_dir, schedule):
    out_dir.mkdir(parents=True, exist_ok=True)
    be = TvmBackend()
    info = be.emit(graph, {"tvm": {"schedule": schedule}}, out_dir)
    be.build(out_dir, info)
    return info, be.load(out_dir, info, graph)


@pytest.mark.parametrize("make", [_conv_graph, _arith_graph], ids=["conv", "arith"])
def test_auto_schedule_is_bit_exact(tmp_path, make):
    g = make(np.random.default_rng(11))
    info, run = _build(g, tmp_path, "auto")
    assert info["schedule"] == "auto"
    for batch in (1, 5):
        feeds = _feeds(g, np.random.default_rng(batch), batch)
        _assert_exact(g, run(feeds), ref.execute(g, feeds, codes=True))


def test_auto_schedule_float_matches_unscheduled(tmp_path):
    g = _float_graph(np.random.default_rng(12))
    _, run_auto = _build(g, tmp_path / "auto", "auto")
    _, run_none = _build(g, tmp_path / "none", "none")
    feeds = _feeds(g, np.random.default_rng(3), 4)
    a, b = run_auto(feeds), run_none(feeds)
    _assert_exact(g, a, ref.execute(g, feeds, codes=True))
    for o in g.outputs:
        np.testing.assert_allclose(a[o], b[o], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [_float_graph, _conv_graph], ids=["float", "int64"])
def test_auto_schedule_vectorizes_reductions(make):
    from tvm import relax

    g = make(np.random.default_rng(13))
    with tvm.target.Target({"kind": "llvm"}):
        fused = relax.get_pipeline("zero")(lower(g))
    before = fused.script()
    after = schedule_cpu(fused).script()
    assert "T.vectorized" not in before
    assert "T.vectorized" in after
    # the conv's reduction loops now sit outside the vectorized output-channel loop (the
    # bit-exact test above therefore runs reordered int64 reductions)
    assert "conv2d_nhwc_init" in after and "conv2d_nhwc_update" in after


def test_unknown_schedule_is_rejected(tmp_path):
    g = _float_graph(np.random.default_rng(14))
    with pytest.raises(CompileError, match="schedule"):
        TvmBackend().emit(g, {"tvm": {"schedule": "fast"}}, tmp_path)
