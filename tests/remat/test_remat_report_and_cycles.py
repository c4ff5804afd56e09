"""The remat section of report.md, and the estimator's cycles as the remat cost."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from qdeploy.backends.hls4ml.cycles import cycle_costs
from qdeploy.compiler.errors import QDeployError
from qdeploy.compiler.reference import execute
from qdeploy.passes import PassContext
from qdeploy.passes import remat as R
from qdeploy.passes.memory import node_costs

from .graphs import feeds, skip_block, two_skips


def test_report_md_has_memory_section_with_numbers(tmp_path):
    import qdeploy.api as api
    g = skip_block(np.random.default_rng(7))
    res = api.compile(g, target="reference", out_dir=tmp_path / "a", memory_budget="0.9")
    rm = json.loads((tmp_path / "a" / "report.json").read_text())["remat"]
    md = (tmp_path / "a" / "report.md").read_text()
    assert "## Memory (rematerialization)" in md
    sec = md.split("## Memory (rematerialization)", 1)[1]
    assert f"{rm['peak_before']} B" in sec and f"{rm['peak_after']} B" in sec
    assert f"budget: {rm['budget_bytes']} B" in sec
    assert f"compute overhead: {rm['overhead_pct']:.2f}%" in sec
    assert re.search(rf"status {rm['status']}, solve time {rm['solve_s']:.2f} s", sec)
    assert rm["peak_after"] < rm["peak_before"] and rm["recomputed"]
    assert all(n in sec for n in rm["recomputed"])
    assert res.report["exactness"]["bit_exact"]
    # no budget: no section
    api.compile(g, target="reference", out_dir=tmp_path / "b")
    assert "Memory (rematerialization)" not in (tmp_path / "b" / "report.md").read_text()


def test_report_md_not_needed_budget(tmp_path):
    import qdeploy.api as api
    g = skip_block(np.random.default_rng(7))
    api.compile(g, target="reference", out_dir=tmp_path / "a", memory_budget="1MiB")
    sec = (tmp_path / "a" / "report.md").read_text().split("## Memory (rematerialization)", 1)[1]
    assert "status not-needed" in sec and "recomputed: none" in sec


@pytest.mark.parametrize("make", [skip_block, two_skips])
def test_cycles_cost_gives_valid_schedule_within_budget(make):
    g = make(np.random.default_rng(7))
    costs, notes = cycle_costs(g)
    assert set(costs) == {n.name for n in g.nodes} and all(c >= 1 for c in costs.values())
    macs = node_costs(g, "macs")
    assert costs != macs  # cycles, not MACs, for device nodes
    with PassContext(cost_models={"cycles": cycle_costs}):  # the documented way to supply it
        g2, rep = R.rematerialize(g, 0.9, cost="cycles")
    assert rep["cost"] == "cycles" and rep["status"] == "optimal"
    assert rep["peak_after"] <= rep["budget_bytes"] < rep["peak_before"]
    # the schedule is valid: the rewritten graph is bit-identical and its measured peak is the predicted one
    rng = np.random.default_rng(2)
    f = feeds(g, rng, batch=1)
    pk = {"packing": "byte"}
    got = execute(g2, f, codes=True, peak=pk)
    want = execute(g, f, codes=True)
    assert all(np.array_equal(got[o], want[o]) for o in g.outputs)
    assert pk["peak_bytes"] == rep["peak_after"]
    # the overhead is measured in cycles
    p = R.Problem.from_graph(g, costs=costs)
    base = sum(p.costs)
    extra = sum(costs[n] for n in rep["recomputed"])
    assert rep["overhead_pct"] == pytest.approx(100.0 * extra / base)
    # default unchanged: MACs
    assert R.rematerialize(g, 0.9)[1]["cost"] == "macs"


def test_cycles_cost_falls_back_to_macs_for_unpriced_nodes(monkeypatch):
    from qdeploy.backends.hls4ml import estimate as E
    from qdeploy.compiler.errors import UnsupportedError
    g = skip_block(np.random.default_rng(7))
    macs = node_costs(g, "macs")
    real = E.estimate

    def host_gap(graph, config=None):  # the estimator leaves 'gap' on the host
        est = real(graph, config)
        for r in est["layers"]:
            if r["name"] == "gap":
                r["host"] = True
        return est
    monkeypatch.setattr(E, "estimate", host_gap)
    costs, notes = cycle_costs(g)
    assert costs["gap"] == macs["gap"] and "gap" in notes[0]

    def refuse(graph, config=None):
        raise UnsupportedError("op 'Foo' has no hls4ml estimate", "conv_a")
    monkeypatch.setattr(E, "estimate", refuse)
    costs, notes = cycle_costs(g)
    assert costs == macs and "MACs used for every node" in notes[0]
    with PassContext(cost_models={"cycles": cycle_costs}):
        _, rep = R.rematerialize(g, 0.9, cost="cycles")
    assert rep["peak_after"] <= rep["budget_bytes"] and any("MACs used" in n for n in rep["notes"])
    with pytest.raises(ValueError, match="unknown cost"):
        R.rematerialize(g, 0.9, cost="flops")


def test_cycles_cost_needs_a_provider_in_the_pass_context():
    """Passes import no backend: without a ``cycles`` provider the remat pass says how to give one."""
    g = skip_block(np.random.default_rng(7))
    with pytest.raises(QDeployError, match="no provider.*cost_models"):
        R.rematerialize(g, 0.9, cost="cycles")
    with pytest.raises(QDeployError, match="no provider"):
        R.Problem.from_graph(g, cost_model="cycles")
    # a provider receives (graph, options) and its costs drive the solver
    seen = {}

    def flat(graph, options):
        seen["options"] = options
        return {n.name: 7 for n in graph.nodes}, ["flat costs"]
    with PassContext(cost_models={"cycles": flat}):
        _, rep = R.rematerialize(g, 0.9, cost="cycles", estimator={"part": "xcvu9p"})
        assert seen["options"] == {"part": "xcvu9p"} and "flat costs" in rep["notes"]
        assert R.Problem.from_graph(g, cost_model="cycles").costs == [7] * len(g.nodes)


def test_compile_registers_cycles_for_the_remat_pass(tmp_path):
    """``memory_budget: {cost: cycles}`` stays data in the pipeline; api.compile supplies the provider."""
    import qdeploy.api as api
    g = skip_block(np.random.default_rng(7))
    res = api.compile(g, target="reference", out_dir=tmp_path / "a",
                      config={"memory_budget": {"budget": 0.9, "cost": "cycles"}})
    assert res.report["remat"]["cost"] == "cycles" and res.report["remat"]["peak_after"] <= 0.9 * res.report["remat"]["peak_before"]
    assert {"name": "remat", "options": {"budget": 0.9, "cost": "cycles"}} in res.report["pipeline"]
    assert res.report["exactness"]["bit_exact"]
