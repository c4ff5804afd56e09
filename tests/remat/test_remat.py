"""Memory analysis, rematerialization solvers, rewrite exactness, errors, CLI."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from qdeploy.compiler.errors import UnsupportedError
from qdeploy.compiler.ir.cost import value_bytes
from qdeploy.compiler.ir import Graph, Value, parse_type
from qdeploy.compiler.reference import execute
from qdeploy.passes import remat as R
from qdeploy.passes.memory import memory_profile, min_feasible_bytes, parse_memory_budget

from ..conftest import REALCASES, REPO
from .graphs import feeds, skip_block, two_skips

RESIDUAL = REALCASES / "qonnx-residual-block" / "residual_block_clean.onnx"
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="module")
def graphs():
    rng = np.random.default_rng(7)
    return {"skip_block": skip_block(rng), "two_skips": two_skips(rng)}


def _residual():
    import qdeploy
    if not RESIDUAL.exists():
        pytest.skip("realcase qonnx-residual-block not present")
    return qdeploy.load(str(RESIDUAL))


def test_packing_of_a_6_bit_tensor():
    v = Value("t", (10, 3), parse_type("fixed<6,2>"))
    assert value_bytes(v, "byte") == 30          # ceil(6/8) = 1 byte per element
    assert value_bytes(v, "bit") == 23           # ceil(30*6/8)
    assert value_bytes(v, "container") == 30     # int8_t
    assert value_bytes(v, "runtime") == 240      # int64 codes
    assert value_bytes(Value("u", (5,), parse_type("fixed<18,4>")), "byte") == 15
    assert value_bytes(Value("u", (5,), parse_type("fixed<18,4>")), "container") == 20
    assert value_bytes(Value("f", (5,), parse_type("float32")), "bit", batch=2) == 40


@pytest.mark.parametrize("packing", ["byte", "bit", "container", "runtime"])
def test_analysis_equals_reference_measured_peak(graphs, packing):
    rng = np.random.default_rng(1)
    cases = list(graphs.values())
    cases += [R.rematerialize(g, 0.9)[0] for g in graphs.values()]  # measured under every packing
    for g in cases:
        pk = {"packing": packing}
        execute(g, feeds(g, rng, batch=3), codes=True, peak=pk)
        prof = memory_profile(g, packing, batch=3)
        assert pk["peak_bytes"] == prof.peak, g.name
        assert pk["per_step"] == list(prof.per_step), g.name


def test_residual_realcase_peak_and_lower_bound():
    g = _residual()
    x = np.load(REALCASES / "qonnx-residual-block" / "synthetic_input_1x1x200x200.npy")
    pk = {}
    out = execute(g, {g.inputs[0]: np.transpose(x, (0, 2, 3, 1))}, peak=pk)
    prof = memory_profile(g)
    assert pk["peak_bytes"] == prof.peak
    t = 49 * 49 * 14 * 4
    assert prof.peak == 3 * t  # the skip tensor is held across both convs: 3 float32 maps live
    assert "Conv_0_out0" in prof.live_at_peak
    lb, why = min_feasible_bytes(g)
    assert lb == prof.peak  # ... and no schedule can do better (the Add needs 3 maps)
    with pytest.raises(R.RematError, match=rf"minimum feasible peak {lb} B"):
        R.rematerialize(g, 0.95)
    assert out[g.outputs[0]].shape == (1, 12, 12, 14)


def test_budget_parsing():
    assert parse_memory_budget("48KiB") == ("bytes", 49152)
    assert parse_memory_budget("0.8") == ("fraction", 0.8)
    assert parse_memory_budget("80%") == ("fraction", 0.8)
    assert parse_memory_budget("1.5MB") == ("bytes", 1.5e6)
    with pytest.raises(ValueError, match="bad memory budget"):
        parse_memory_budget("lots")
    assert parse_memory_budget("49152") == ("bytes", 49152) and parse_memory_budget("48B") == ("bytes", 48)
    for ambiguous in ("1.5", "2", "63"):  # a mistyped fraction must not become a 1-byte budget
        with pytest.raises(ValueError, match="fraction of the peak .* or a whole number of bytes"):
            parse_memory_budget(ambiguous)


def test_rewrite_names_and_bit_identical_reference(graphs):
    rng = np.random.default_rng(2)
    for g in graphs.values():
        g2, rep = R.rematerialize(g, 0.9)
        assert rep["status"] == "optimal" and rep["peak_after"] <= rep["budget_bytes"] < rep["peak_before"]
        assert rep["overhead_pct"] > 0 and rep["recomputed"]
        assert any(n.name.endswith("__r1") for n in g2.nodes)
        assert g2.meta["remat"]["peak_after"] == rep["peak_after"]
        f = feeds(g, rng, batch=4)
        a, b = execute(g, f, codes=True), execute(g2, f, codes=True)
        assert all(np.array_equal(a[o], b[o]) for o in g.outputs)
        # a Graph round-trip keeps the duplicated nodes
        doc, arrays = g2.to_json()
        assert [n.name for n in Graph.from_json(doc, arrays).nodes] == [n.name for n in g2.nodes]


def _random_small(seed):
    from benchmarks.remat_graphs import random_layered
    return random_layered(14, seed=seed)


@pytest.mark.parametrize("case", ["skip_block", "two_skips", "rand1", "rand2", "rand3"])
def test_cp_meets_budget_and_matches_milp(graphs, case):
    p = R.Problem.from_graph(graphs[case]) if case in graphs else _random_small(int(case[-1]))
    base = R.evaluate(p, R.no_remat(p))
    for frac in ((0.9,) if case in graphs else (0.9, 0.8)):
        b = int(frac * base.peak)
        if b < p.lower_bound():
            continue
        cp = R.solve_cp(p, b, max_copies=3, time_limit=10, workers=2)
        milp = R.solve_milp(p, b, time_limit=10)
        if cp.feasible:
            assert cp.peak <= b
            assert R.evaluate(p, cp.schedule).peak == cp.peak
            assert cp.bound is not None and cp.bound <= cp.cost + 1e-6
        if milp.feasible:
            assert milp.peak <= b
            copies = max(np.bincount([v for v, _ in milp.schedule.steps]))
            if milp.status == "optimal" and copies <= 3:
                # every Checkmate schedule with <= C copies is in the CP model's space
                assert cp.feasible
                assert cp.cost <= milp.cost or (cp.status != "optimal" and cp.bound <= milp.cost)
        if cp.status == "infeasible":
            assert not milp.feasible or max(np.bincount([v for v, _ in milp.schedule.steps])) > 3


def test_greedy_is_valid_and_no_better_than_cp(graphs):
    p = R.Problem.from_graph(graphs["two_skips"])
    b = int(0.9 * R.evaluate(p, R.no_remat(p)).peak)
    g = R.solve_greedy(p, b)
    cp = R.solve_cp(p, b, time_limit=10)
    assert g.feasible and cp.status == "optimal" and cp.cost <= g.cost


def test_infeasible_budget_names_smallest_feasible_peak(graphs):
    g = graphs["skip_block"]
    lb, _ = min_feasible_bytes(g)
    with pytest.raises(R.RematError, match=rf"below the minimum feasible peak {lb} B"):
        R.rematerialize(g, lb - 1)
    # above the lower bound but below what 2 copies per node can reach
    best = R.rematerialize(g, 0.9)[1]["peak_after"]
    assert lb < best
    with pytest.raises(R.RematError, match=rf"smallest feasible peak {best} B \(.*\) \(proven minimum\)"):
        R.rematerialize(g, best - 1)


def test_not_needed_and_stateful_refused(graphs):
    g = graphs["skip_block"]
    g2, rep = R.rematerialize(g, 1.0)
    assert g2 is g and rep["status"] == "not-needed"
    bad = g.with_(nodes=[n.replace(attrs={**n.attrs, "stateful": True}) if n.name == "conv_a" else n for n in g.nodes])
    with pytest.raises(UnsupportedError, match="conv_a"):
        R.rematerialize(bad, 0.9)


def test_tvm_runs_rewritten_graph_bit_identical(graphs, tmp_path):
    pytest.importorskip("tvm")
    from qdeploy.backends import get_backend
    rng = np.random.default_rng(3)
    be = get_backend("tvm-llvm")
    for name, g in graphs.items():
        g2, _ = R.rematerialize(g, 0.9)
        d = tmp_path / name
        d.mkdir()
        info = be.emit(g2, {}, d)
        be.build(d, info)
        fn = be.load(d, info, g2)
        f = feeds(g, rng, batch=5)
        want = execute(g, f, codes=True)
        got = fn(f)
        assert all(np.array_equal(np.asarray(got[o]), want[o]) for o in g.outputs), name


@pytest.mark.slow
def test_hls4ml_runs_rewritten_graph_bit_identical(graphs, tmp_path):
    from qdeploy.backends import get_backend
    rng = np.random.default_rng(4)
    g = graphs["skip_block"]
    g2, _ = R.rematerialize(g, 0.9)
    be = get_backend("hls4ml")
    info = be.emit(g2, {}, tmp_path)
    be.build(tmp_path, info)
    fn = be.load(tmp_path, info, g2)
    f = feeds(g, rng, batch=4)
    want = execute(g, f, codes=True)
    got = fn(f)
    assert all(np.array_equal(np.asarray(got[o]), want[o]) for o in g.outputs)


def test_cli_memory_budget(graphs, tmp_path):
    from typer.testing import CliRunner

    from qdeploy.cli import app
    g = graphs["skip_block"]
    g.save(str(tmp_path / "m"))
    import qdeploy.api as api
    res = api.compile(g, target="reference", out_dir=tmp_path / "a", memory_budget="0.9")
    rm = res.report["remat"]
    assert rm["peak_after"] <= rm["budget_bytes"] and res.report["exactness"]["bit_exact"]
    assert json.loads((tmp_path / "a" / "report.json").read_text())["remat"]["status"] == "optimal"
    # the CLI: an infeasible budget is one clear line, exit 2
    onnx_path = RESIDUAL
    if onnx_path.exists():
        r = CliRunner().invoke(app, ["compile", str(onnx_path), "-t", "reference", "-o", str(tmp_path / "b"),
                                     "--memory-budget", "0.5"])
        assert r.exit_code == 2, r.output
        assert "minimum feasible peak" in r.output and "error: pass remat: memory budget " in r.output
        r = CliRunner().invoke(app, ["compile", str(onnx_path), "-t", "reference", "-o", str(tmp_path / "c"),
                                     "--memory-budget", "1MiB"])
        assert r.exit_code == 0, r.output
        assert "memory: peak" in r.output and "not-needed" in r.output
