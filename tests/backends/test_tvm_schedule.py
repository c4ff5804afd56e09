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


def test_auto_is_the_default_and_none_stays_selectable(tmp_path):
    g = _conv_graph(np.random.default_rng(15))
    be = TvmBackend()
    feeds = _feeds(g, np.random.default_rng(4), 3)
    want = ref.execute(g, feeds, codes=True)
    for name, cfg, sched in (("dflt", {}, "auto"), ("none", {"tvm": {"schedule": "none"}}, "none")):
        d = tmp_path / name
        d.mkdir()
        info = be.emit(g, cfg, d)
        assert info["schedule"] == sched
        assert ("parallel" in info) == (sched == "auto")
        be.build(d, info)
        _assert_exact(g, be.load(d, info, g)(feeds), want)
    assert (tmp_path / "dflt").joinpath("tvm_build.json").read_text() != (tmp_path / "none").joinpath("tvm_build.json").read_text()


@pytest.mark.parametrize("bad", [{"parallel": "yes"}, {"min_parallel_work": -1}, {"min_parallel_work": 1.5}])
def test_bad_parallel_options_are_rejected(tmp_path, bad):
    g = _float_graph(np.random.default_rng(16))
    with pytest.raises(CompileError, match=f"tvm.{next(iter(bad))}"):
        TvmBackend().emit(g, {"tvm": bad}, tmp_path)


def _scheduled_funcs(graph, **kw):
    """{name: (PrimFunc before scheduling, TVMScript after)} of the fused module of ``graph``."""
    from tvm import relax, tirx

    from qdeploy.passes.partition import split_epilogue

    core, _ = split_epilogue(graph)
    with tvm.target.Target({"kind": "llvm"}):
        fused = relax.get_pipeline("zero")(lower(core))
    before = {gv.name_hint: f for gv, f in fused.functions_items() if isinstance(f, tirx.PrimFunc)}
    after = schedule_cpu(fused, **kw)
    return {gv.name_hint: (before[gv.name_hint], f.script()) for gv, f in after.functions_items()
            if isinstance(f, tirx.PrimFunc)}


def test_every_lowered_op_is_parallel_and_vectorized():
    """Every op family the lowering emits (all conformance cases TVM accepts, merged into one
    graph: Dense/matmul, conv1d/2d incl. depthwise, grouped and dilated, pools, elementwise,
    threshold compare-and-count, transpose, pads, ...) gets a parallel and a vectorized loop;
    reshape-pattern functions are left alone (Relax turns them into zero-copy views) and the
    parallel loops over the symbolic batch sit behind the run-time work branch."""
    from tvm import relax

    from tests.conformance.conftest import merge_cases
    from tests.conformance.test_ops import CASES

    cases = [c for c in CASES if "tvm-llvm" not in c.rejects]
    g, _ = merge_cases("sched_cover", cases, seed=7)
    funcs = _scheduled_funcs(g)
    assert len(funcs) > 40
    bad, views = [], 0
    for name, (orig, script) in funcs.items():
        if relax.analysis.has_reshape_pattern(orig):
            views += 1
            assert "T.parallel" not in script and "tirx.is_scheduled" not in script, name
            continue
        if "T.parallel" not in script or "T.vectorized" not in script:
            bad.append(name)
        elif "T.parallel(n" in script:
            assert "if n" in script, f"{name}: parallel over the batch without the work branch"
    assert views > 0
    assert not bad, f"not parallel+vectorized: {bad}"
    # without threads: no parallel loop anywhere
    assert not any("T.parallel" in s for _, s in _scheduled_funcs(g, parallel=False).values())


def test_float_quant_select_chain_compiles_exact(tmp_path):
    """FloatQuant lowers to a chain of ~64 selects whose values are each read several times:
    inlining them all copies every value into every read (exponential TIR, a build that never
    ends) and leaves bool intermediates whose vectorized loads TVM's LLVM codegen rejects.  The
    schedule keeps such values materialized and bool blocks scalar; the build is exact."""
    from tests.conformance.test_ops import BY_ID

    g = BY_ID["float_quant"].graph(seed=3)
    _, run = _build(g, tmp_path, "auto")
    for batch in (1, 6):
        feeds = _feeds(g, np.random.default_rng(20 + batch), batch)
        _assert_exact(g, run(feeds), ref.execute(g, feeds, codes=True))
