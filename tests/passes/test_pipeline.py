"""The pass pipeline as data: registry, pass context, verification, PassError, batched fixpoints."""
import json

import numpy as np
import pytest

import qdeploy
from qdeploy.compiler import reference as ref
from qdeploy.compiler.errors import PassError, VerifyError
from qdeploy.compiler.ir import Const, GraphBuilder, parse_type
from qdeploy.compiler.ir.types import FloatType
from qdeploy.passes import (PassContext, PassManager, default_pipeline, describe_pipeline, dump_to, fold,
                            fold_affine_chains, get_pass, pass_names)

from tests.conftest import small_mlp


def test_registry_and_default_pipeline_are_data():
    assert {"dce", "fold_batchnorm", "fold_affine_chains", "quantize_inputs", "affine_to_fixed", "infer_precision",
            "remat"} <= set(pass_names())
    assert get_pass("fold_affine_chains") is fold_affine_chains
    with pytest.raises(qdeploy.compiler.errors.QDeployError, match="unknown pass 'nope'; known passes: "):
        get_pass("nope")
    p = default_pipeline("auto", {"x": np.zeros((4, 16), np.float32)}, {"budget": 0.8})
    assert [e if isinstance(e, str) else e[0] for e in p] == [
        "dce", "fold_batchnorm", "fold_affine_chains", "fold_lookup_quantize", "quantize_inputs", "affine_to_fixed",
        "infer_precision", "requant_shift", "dce", "remat"]
    d = describe_pipeline(p)
    assert d[4] == {"name": "quantize_inputs", "options": {"input_type": "auto",
                                                          "calibration": {"x": "array[4, 16] float32"}}}
    assert d[-1] == {"name": "remat", "options": {"budget": 0.8}}
    json.dumps(d)  # JSON-friendly
    assert default_pipeline()[-1] == "dce"  # no budget, no remat


def _bad_graph(rng):
    """A graph whose recorded output type contradicts the op's type rule (as a buggy pass would leave it)."""
    g = small_mlp(rng)
    v = g.values["relu1"]
    return g.with_(values={**g.values, "relu1": v.__class__(v.name, v.shape, parse_type("fixed<3,1>"))})


def test_verify_runs_before_the_first_pass(rng):
    with pytest.raises(VerifyError, match=r"input graph \(before the first pass, dce\): .*rule gives") as e:
        PassManager(["dce"]).run(_bad_graph(rng))
    assert e.value.node == "relu1"


def test_a_pass_that_breaks_the_graph_is_named(rng):
    bad = _bad_graph(rng)

    def breaker(graph):
        return bad
    with pytest.raises(PassError) as e:
        PassManager(["dce", breaker, "infer_precision"]).run(small_mlp(rng))
    assert e.value.pass_name == "breaker" and e.value.node == "relu1"
    assert e.value.one_line().startswith("pass breaker: node 'relu1': left an invalid graph: ")


def test_a_failing_pass_is_named_and_keeps_its_cause(rng):
    def explode(graph):
        raise KeyError("weight")
    with pytest.raises(PassError) as e:
        PassManager(["dce", explode]).run(small_mlp(rng))
    assert e.value.one_line() == "pass explode: KeyError: 'weight'"
    assert isinstance(e.value.cause, KeyError)


def test_cli_error_names_the_failing_pass(tmp_path, rng):
    from typer.testing import CliRunner

    from qdeploy.cli import app
    from qdeploy.compiler.frontends.export import export_qonnx
    export_qonnx(small_mlp(rng), tmp_path / "m.onnx")
    r = CliRunner().invoke(app, ["compile", str(tmp_path / "m.onnx"), "-t", "reference", "-o", str(tmp_path / "b"),
                                 "--memory-budget", "64B"])
    assert r.exit_code == 2, r.output
    assert r.output.splitlines() == ["error: pass remat: memory budget 64 B is below the minimum feasible peak "
                                     "96 B (node 'x_quant' (inputs + output)); no schedule can fit "
                                     "(unrematerialized peak 96 B)"]
    assert not (tmp_path / "b").exists()


def test_cli_malformed_budget_is_an_argument_error_not_a_pass_failure(tmp_path, rng):
    from typer.testing import CliRunner

    from qdeploy.cli import app
    from qdeploy.compiler.frontends.export import export_qonnx
    export_qonnx(small_mlp(rng), tmp_path / "m.onnx")
    r = CliRunner().invoke(app, ["compile", str(tmp_path / "m.onnx"), "-t", "reference", "-o", str(tmp_path / "b"),
                                 "--memory-budget", "abc"])
    assert r.exit_code == 2, r.output
    lines = r.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: memory budget: bad memory budget 'abc'"), r.output
    assert not (tmp_path / "b").exists()


def test_context_collects_notes_and_results_per_pass(rng, tmp_path):
    pm = PassManager(default_pipeline(), dump=dump_to(tmp_path / "ir"))
    g = pm.run(small_mlp(rng))
    rec = {r.name: r for r in pm.records}
    assert rec["quantize_inputs"].notes and rec["quantize_inputs"].notes[0].startswith("x: ")
    assert pm.context.notes == [n for r in pm.records for n in r.notes]
    dumps = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert dumps[0] == "01_dce.txt" and dumps[-1] == "09_dce.txt" and len(dumps) == 9
    assert (tmp_path / "ir" / "09_dce.txt").read_text() == str(g) + "\n"
    # a pass called outside a manager: notes go to the active context, or nowhere
    with PassContext() as ctx:
        get_pass("quantize_inputs")(small_mlp(rng))
    assert ctx.notes and ctx.notes[0].startswith("x: ")


def test_compile_report_shows_the_pipeline_and_remat_runs_as_a_pass(tmp_path, rng):
    res = qdeploy.compile(small_mlp(rng), "reference", tmp_path / "a", memory_budget="1MiB")
    names = [p["name"] for p in res.report["pipeline"]]
    assert names[-1] == "remat" and names[0] == "dce"
    assert res.report["pipeline"][-1]["options"] == {"budget": "1MiB"}
    assert [p["name"] for p in res.report["passes"]] == names
    assert res.report["remat"]["status"] == "not-needed"
    md = (tmp_path / "a" / "report.md").read_text()
    assert "Pipeline: dce -> fold_batchnorm -> fold_affine_chains -> fold_lookup_quantize -> quantize_inputs(" in md
    assert "-> remat(budget='1MiB')" in md and "## Memory (rematerialization)" in md
    res = qdeploy.compile(small_mlp(rng), "reference", tmp_path / "b")
    assert [p["name"] for p in res.report["pipeline"]][-1] == "dce" and res.report["remat"] is None


def _affine(b, name, h, s, t):
    return b.add(name, "Affine", [h], params={"scale": Const(np.float32(s), FloatType()),
                                             "bias": Const(np.float32(t), FloatType())})


def test_fixpoint_batches_rewrites_per_sweep_and_merges_chains_left_to_right(monkeypatch):
    rng = np.random.default_rng(3)
    b = GraphBuilder("chains")
    outs, chains = [], []
    for c in range(4):
        h = b.input(f"x{c}", (5,), FloatType())
        params = [(rng.uniform(0.3, 3, 5).astype(np.float32), rng.normal(size=5).astype(np.float32))
                  for _ in range(4 if c == 0 else 2)]
        for k, (s, t) in enumerate(params):
            h = _affine(b, f"a{c}_{k}", h, s, t)
        chains.append(params)
        outs.append(b.add(f"r{c}", "Relu", [h]))
    b.output(*outs)
    g = b.build()
    calls = []
    real = fold.rebuild
    monkeypatch.setattr(fold, "rebuild", lambda *a, **k: calls.append(1) or real(*a, **k))
    with PassContext() as ctx:
        g2 = fold_affine_chains(g)
    # sweep 1: chain 0's first pair and every 2-chain merge; sweep 2: chain 0 again; sweep 3
    # (a0_0..a0_2, a0_3); sweep 4 finds nothing.  One rewrite at a time needed 7 rebuilds.
    assert len(calls) == 4
    assert len(ctx.notes) == 6
    assert [n.op for n in g2.nodes] == ["Affine", "Relu"] * 4
    s, t = (np.float64(chains[0][0][0]), np.float64(chains[0][0][1]))
    for s2, t2 in chains[0][1:]:  # pairwise from the start of the chain, float32 after each merge
        s, t = np.float32(s * s2.astype(np.float64)), np.float32(t * s2.astype(np.float64) + t2)
        s, t = np.float64(s), np.float64(t)
    a0 = g2.nodes[0]
    assert a0.name == "a0_0" and np.array_equal(a0.params["scale"].real(), s.astype(np.float32))
    assert np.array_equal(a0.params["bias"].real(), t.astype(np.float32))
    x = {f"x{c}": rng.normal(size=(8, 5)).astype(np.float32) for c in range(4)}
    got, want = ref.execute(g2, x), ref.execute(g, x)
    for o in g.outputs:
        np.testing.assert_allclose(got[o], want[o], rtol=1e-5, atol=1e-5)


def test_config_memory_budget_becomes_the_remat_step(tmp_path, rng):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("memory_budget: {budget: 1.0, method: greedy, time_limit: 2, colour: blue}\n")
    res = qdeploy.compile(small_mlp(rng), "reference", tmp_path / "a", config=cfg)
    assert res.report["pipeline"][-1] == {"name": "remat", "options": {"budget": 1.0, "time_limit": 2,
                                                                       "method": "greedy"}}
    assert res.report["remat"]["method"] == "greedy" and res.report["remat"]["time_limit_s"] == 2
    # the argument overrides the config's budget, keeping its options
    res = qdeploy.compile(small_mlp(rng), "reference", tmp_path / "b", config=cfg, memory_budget="1MiB")
    assert res.report["pipeline"][-1]["options"] == {"budget": "1MiB", "time_limit": 2, "method": "greedy"}
    # optimize=False: remat is the whole pipeline
    res = qdeploy.compile(small_mlp(rng), "reference", tmp_path / "c", config=cfg, optimize=False)
    assert [p["name"] for p in res.report["pipeline"]] == ["remat"]
