"""Early-exit splitting, integer gating, calibration, MultiStageModel (reference, tvm-llvm;
hls4ml behind -m slow)."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

pytest.importorskip("brevitas")


def _example():
    spec = importlib.util.spec_from_file_location("ee_model", REPO / "examples" / "early_exit" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from qdeploy.compiler.frontends.early_exit import export_early_exit
    from qdeploy.compiler.quantization.branchy import predict_exits, train_joint
    M = _example()
    x_tr, y_tr, x_te, y_te = M.load_data(images=True)
    xa, xv, ya, yv = M.split_validation(x_tr, y_tr)
    net = M.make_branchy_cnn(channels=(4, 8, 16))
    train_joint(net, (xa, ya), epochs=6)
    path = export_early_exit(net, x_te[:1], tmp_path_factory.mktemp("ee") / "branchy.onnx")
    return dict(net=net, path=path, xv=xv, yv=yv, x_te=x_te, y_te=y_te, bv=predict_exits(net, x_te))


@pytest.fixture(scope="module")
def programs(trained, tmp_path_factory):
    from qdeploy.early_exit import compile_early_exit
    root = tmp_path_factory.mktemp("progs")
    return {t: compile_early_exit(str(trained["path"]), t, root / t, golden=trained["xv"])
            for t in ("reference", "tvm-llvm")}


def test_multi_output_import_matches_brevitas(trained):
    from qdeploy.compiler import reference
    from qdeploy.compiler.frontends import import_onnx
    from qdeploy.runtime.compiled import user_feeds
    g = import_onnx(str(trained["path"]))
    assert list(g.outputs) == ["exit_pool1", "exit_pool2", "exit_final"]
    out = reference.execute(g, user_feeds(g, trained["x_te"]), codes=True)
    for o, bv in zip(g.outputs, trained["bv"]):
        np.testing.assert_array_equal(g.value(o).dtype.to_real(out[o]), bv.astype(np.float64))


def test_split_stages_compose_to_the_whole_graph(programs, trained):
    from qdeploy.compiler import reference
    from qdeploy.passes.early_exit import split_exits
    from qdeploy.runtime.compiled import user_feeds
    g = programs["reference"].program
    prog = split_exits(g)
    assert len(prog.stages) == 3 and prog.exits == list(g.outputs)
    assert all(len(c) == 1 for c in prog.carried[:2]) and prog.carried[2] == []
    assert prog.bops[0] < prog.bops[1] and sum(prog.bops) > prog.final_only_bops
    # stage k is exactly: carried tensors in -> exit k + carried out
    feeds = user_feeds(g, trained["x_te"])
    full = reference.execute(g, feeds, codes=True, keep=True)
    env = dict(feeds)
    for sg in prog.stages:
        out = reference.execute(sg, {i: env[i] for i in sg.inputs}, codes=True)
        for o, a in out.items():
            np.testing.assert_array_equal(a, full[o])
        env.update(out)


@pytest.mark.parametrize("target", ["reference", "tvm-llvm"])
def test_each_stage_bit_exact_vs_reference(programs, trained, target):
    from qdeploy.compiler import reference
    from qdeploy.runtime.compiled import user_feeds
    msm = programs[target]
    g = msm.program
    env = reference.execute(g, user_feeds(g, trained["x_te"]), codes=True, keep=True)
    for s in msm.plan["stages"]:
        assert s["exactness"]["bit_exact"] and s["exactness"]["samples"] == len(trained["xv"])
        cm = msm.stages[s["name"]]
        got = cm.run_codes({i: env[i] for i in cm.graph.inputs})
        for o in cm.graph.outputs:
            np.testing.assert_array_equal(got[o], env[o], err_msg=f"{target} {s['name']} {o}")


def _gate_sets(msm, trained):
    from qdeploy.early_exit import calibrate_gates
    from qdeploy.runtime.multistage import make_gate
    dts = [msm.program.value(v).dtype for v in msm.exit_values()]
    sets = [[make_gate("never", None)] * 2 + [{"rule": "always"}],
            [make_gate("max_softmax", dts[0], 0.9), make_gate("max_softmax", dts[1], 0.8), {"rule": "always"}],
            [make_gate("entropy", dts[0], 0.2), make_gate("entropy", dts[1], 0.3), {"rule": "always"}],
            [make_gate("margin", dts[0], 2.0), make_gate("never", None), {"rule": "always"}]]
    sets.append(calibrate_gates(msm, trained["xv"], trained["yv"], max_drop=1.0)["gates"])
    return sets


def test_multistage_equals_full_network_with_host_gating(programs, trained):
    from qdeploy.early_exit import exit_codes
    x = trained["x_te"]
    ref = programs["reference"]
    codes = exit_codes(ref, x)
    for gates in _gate_sets(ref, trained):
        want_p, want_e = ref.with_gates(gates).decide(codes)
        for target, msm in programs.items():
            m = msm.with_gates(gates)
            p, e = m.predict(x)
            np.testing.assert_array_equal(p, want_p, err_msg=f"{target} {gates}")
            np.testing.assert_array_equal(e, want_e, err_msg=f"{target} {gates}")
            # later stages ran only on undecided inputs
            assert m.last_stage_rows == [len(x)] + [int(np.sum(want_e >= k)) for k in range(1, 3)]


def test_never_exit_equals_unsplit_model(programs, trained, tmp_path):
    import qdeploy
    x = trained["x_te"]
    unsplit = qdeploy.compile(str(trained["path"]), target="tvm-llvm", out_dir=tmp_path / "unsplit",
                              golden=trained["xv"]).load()
    final = unsplit.predict(x)[2]
    for msm in programs.values():
        p, e = msm.predict(x)  # default plan: early gates 'never'
        assert (e == 2).all()
        np.testing.assert_array_equal(p, final.argmax(1))


def test_integer_gates_match_float_rules(programs, trained):
    from qdeploy.early_exit import exit_codes
    from qdeploy.runtime.multistage import DEFAULT_LUT_BITS, gate_mask, make_gate
    msm = programs["reference"]
    codes = exit_codes(msm, trained["x_te"])
    Q = DEFAULT_LUT_BITS
    for v in msm.exit_values():
        t = msm.program.value(v).dtype
        z = t.to_real(codes[v])
        zs = z - z.max(1, keepdims=True)
        S = np.exp(zs).sum(1)
        p = np.exp(zs) / S[:, None]
        K = z.shape[1]
        band = K * 2.0 ** -(Q + 1) + 1e-12
        H = -(p * np.log(np.where(p > 0, p, 1))).sum(1) / math.log(K)
        top2 = np.sort(z, 1)[:, -2:]
        for thr in (0.3, 0.5, 0.8, 0.9, 0.99, 0.999):
            m_int = gate_mask(make_gate("max_softmax", t, thr), codes[v], t)
            diff = m_int != (1.0 / S >= thr)
            assert np.all(np.abs(S[diff] - 1 / thr) <= band), (v, thr)
        for tau in (0.05, 0.2, 0.5):
            m_int = gate_mask(make_gate("entropy", t, tau), codes[v], t)
            diff = m_int != (H <= tau)
            assert np.all(np.abs(H[diff] - tau) <= 1e-3), (v, tau)
        for marg in (0.0, 0.5, 1.0, 3.0):
            m_int = gate_mask(make_gate("margin", t, marg), codes[v], t)
            np.testing.assert_array_equal(m_int, top2[:, 1] - top2[:, 0] >= marg)


def test_calibration_accuracy_and_budget(programs, trained):
    from qdeploy.early_exit import calibrate_gates, evaluate
    msm = programs["reference"]
    xv, yv = trained["xv"], trained["yv"]
    cal = calibrate_gates(msm, xv, yv, max_drop=1.0)
    assert cal["accuracy"] >= cal["final_accuracy"] - 0.01 - 1e-12
    r = evaluate(msm.with_gates(cal["gates"]), xv, yv)
    assert abs(r["accuracy"] - cal["accuracy"]) < 1e-12 and abs(r["mean_bops"] - cal["mean_cost"]) < 1e-6
    final_only = msm.plan["meta"]["final_only_bops"]
    for frac in (0.3, 0.6):
        B = frac * final_only
        cal = calibrate_gates(msm, xv, yv, rule="entropy", budget=B)
        r = evaluate(msm.with_gates(cal["gates"]), xv, yv)
        assert 0.98 * B <= r["mean_bops"] <= B
    with pytest.raises(Exception, match="no gate setting"):
        calibrate_gates(msm, xv, yv, budget=1.0)


def test_plan_roundtrip_and_errors(programs, trained, tmp_path):
    import shutil
    from qdeploy.runtime.multistage import MultiStageModel, PlanError, make_gate
    src = programs["reference"].out_dir
    d = tmp_path / "copy"
    shutil.copytree(src, d)
    msm = MultiStageModel.load(d)
    gates = [make_gate("max_softmax", msm.program.value(v).dtype, 0.9) for v in msm.exit_values()[:2]]
    gates.append({"rule": "always"})
    m2 = msm.with_gates(gates)
    m2.save_plan(d)
    plan = json.loads((d / "plan.json").read_text())
    assert plan["steps"][0]["exit"]["gate"]["rule"] == "max_softmax"
    p1, e1 = m2.predict(trained["x_te"])
    p2, e2 = MultiStageModel.load(d).predict(trained["x_te"])
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(e1, e2)
    with pytest.raises(PlanError, match="last step's gate must be 'always'"):
        msm.with_gates(gates[:2] + [{"rule": "never"}])
    with pytest.raises(PlanError, match="no plan.json"):
        MultiStageModel.load(tmp_path)
    with pytest.raises(PlanError, match="unknown gate rule"):
        make_gate("bogus", None, 0.5)


def test_unidentifiable_or_misordered_exits_are_clear_errors(programs):
    from qdeploy.passes.early_exit import EarlyExitError, split_exits
    g = programs["reference"].program
    one = g.with_(outputs=[g.outputs[-1]])
    with pytest.raises(EarlyExitError, match="cannot identify exits"):
        split_exits(one)
    with pytest.raises(EarlyExitError, match="not a value"):
        split_exits(g, ["exit_pool1", "nope"])
    inner = g.producer("exit_final").inputs[0]  # exit_final depends on it
    with pytest.raises(EarlyExitError, match="depends on exit 1 .* a later stage"):
        split_exits(g, ["exit_final", inner])
    # exits out of order (a deeper exit first) would make stage 0 nearly the whole model and put every
    # sample out at the weaker head: refused, naming both costs
    with pytest.raises(EarlyExitError, match=r"exit 0 \('exit_pool2'\) costs more to reach .* earliest \(cheapest\) first"):
        split_exits(g, ["exit_pool2", "exit_pool1", "exit_final"])
    with pytest.raises(EarlyExitError, match="costs more to reach"):
        split_exits(g, ["exit_final", "exit_pool1"])
    ok = split_exits(g, ["exit_pool1", "exit_pool2", "exit_final"])
    assert ok.cum_bops == sorted(ok.cum_bops) and len(ok.stages) == 3


def test_attach_exits_errors():
    from torch import nn
    from qdeploy.compiler.frontends.early_exit import attach_exits
    bb = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    net = attach_exits(bb, {"1": nn.Linear(4, 2)})
    assert net.num_exits == 2 and net.exit_names == ["exit_1", "exit_final"]
    with pytest.raises(ValueError, match="not a child"):
        attach_exits(bb, {"x": nn.Identity()})
    with pytest.raises(ValueError, match="last layer"):
        attach_exits(bb, {"2": nn.Identity()})


@pytest.mark.slow
def test_hls4ml_stages_match_reference(trained, programs, tmp_path):
    from qdeploy.early_exit import compile_early_exit
    msm = compile_early_exit(str(trained["path"]), "hls4ml", tmp_path / "hls", golden=trained["xv"])
    assert all(s["exactness"]["bit_exact"] for s in msm.plan["stages"])
    assert all((tmp_path / "hls" / s["dir"] / "manifest.json").is_file() for s in msm.plan["stages"])
    ref = programs["reference"]
    for gates in _gate_sets(ref, trained)[:3]:
        p, e = msm.with_gates(gates).predict(trained["x_te"])
        rp, re_ = ref.with_gates(gates).predict(trained["x_te"])
        np.testing.assert_array_equal(p, rp)
        np.testing.assert_array_equal(e, re_)


def test_program_exits_are_checked_against_the_source(programs, trained):
    # the unsplit program's exits vs the QONNX source (one onnxruntime session with Quant as
    # standard ops, qdeploy/source_ort.py; equal to qonnx's executor) on the golden set
    fid = programs["reference"].plan["meta"]["fidelity"]
    assert fid["checked"] and fid["ok"] and fid["samples"] == len(trained["xv"]), fid
    assert len(fid["per_output"]) == len(programs["reference"].exit_values()) >= 2
    assert fid["real_mismatches"] == 0 and fid["source"].startswith(("onnxruntime, one session", "qonnx execute_onnx"))
