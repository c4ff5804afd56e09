"""tvm.tune: meta-schedule tuning of a tvm-llvm library's static entry at one batch size.

Fast tests: every refusal of the options (one line naming the option), the static entries of the
lowering, and the compile's check of a static entry (a wrong one fails).  The slow test tunes a
tiny MLP with 8 trials and checks, against the reference interpreter, the tuned entry, then that
the stored records rebuild the same library without a trial (from the artifact and through
``tune: {log: ...}``)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import qdeploy  # noqa: E402
from qdeploy.backends import get_backend  # noqa: E402
from qdeploy.backends.progress import reporting  # noqa: E402
from qdeploy.backends.tvm import TvmBackend  # noqa: E402
from qdeploy.backends.tvm import tune as tune_mod  # noqa: E402
from qdeploy.compiler.errors import CompileError  # noqa: E402
from qdeploy.compiler.ir import Const, GraphBuilder, parse_type as T  # noqa: E402
from qdeploy.compiler.reference import execute  # noqa: E402
from qdeploy.report import check_static_batches, compare_outputs, static_batch_sizes  # noqa: E402

X86 = {"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu", "mcpu": "x86-64"}


def _mlp(seed: int = 0, hidden: int = 32, inputs: int = 16):
    rng = np.random.default_rng(seed)
    b = GraphBuilder(f"mlp{seed}")
    x = b.input("x", (inputs,), T("fixed<8,1,RND_CONV,SAT>"))
    d = b.add("d1", "Dense", [x], params={"weight": Const(rng.integers(-32, 32, (inputs, hidden)), T("fixed<6,1>")),
                                          "bias": Const(rng.integers(-64, 64, (hidden,)), T("fixed<8,2>"))})
    r = b.add("r", "Relu", [d])
    d2 = b.add("d2", "Dense", [r], params={"weight": Const(rng.integers(-32, 32, (hidden, 5)), T("fixed<6,1>"))})
    b.output(d2)
    return b.build()


def _records_dir(tmp_path, meta: dict | None):
    d = tmp_path / "rec"
    d.mkdir()
    (d / tune_mod.WORKLOAD_FILE).write_text("")
    (d / tune_mod.RECORD_FILE).write_text("")
    if meta is not None:
        (d / tune_mod.META_FILE).write_text(json.dumps(meta))
    return d


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("tune, words", [
    (64, "tvm.tune must be a mapping"),
    ({"trials": 8, "trails": 2}, "unknown key(s) trails"),
    ({"trials": 0}, "tvm.tune.trials must be an integer >= 1, got 0"),
    ({"trials": True}, "tvm.tune.trials must be an integer >= 1"),
    ({"trials": 8.0}, "tvm.tune.trials must be an integer >= 1"),
    ({"trials": 8, "batch": 0}, "tvm.tune.batch must be an integer >= 1, got 0"),
    ({"trials": 8, "seed": -1}, "tvm.tune.seed must be an integer >= 0"),
    ({"trials": 8, "trials_per_iter": 0}, "tvm.tune.trials_per_iter must be an integer >= 1"),
    ({"batch": 256}, "give either trials (tune now) or log (apply stored records), got neither"),
    ({"trials": 8, "vs_default": "yes"}, "tvm.tune.vs_default must be true or false"),
])
def test_bad_tune_options_refused_before_anything_is_written(tmp_path, tune, words):
    with pytest.raises(CompileError) as e:
        TvmBackend().emit(_mlp(), {"tvm": {"tune": tune}}, tmp_path)
    assert words in str(e.value)
    assert not list(tmp_path.iterdir())  # refused before the graph was saved


def test_log_refusals(tmp_path):
    with pytest.raises(CompileError, match="holds no tuning records"):
        tune_mod.tune_options({"tune": {"log": str(tmp_path / "nowhere")}}, X86)
    d = _records_dir(tmp_path, {"batch": 128, "target": X86})
    with pytest.raises(CompileError, match="not both"):
        tune_mod.tune_options({"tune": {"log": str(d), "trials": 8}}, X86)
    with pytest.raises(CompileError, match="tvm.tune.batch: 256, but the records .* batch 128"):
        tune_mod.tune_options({"tune": {"log": str(d), "batch": 256}}, X86)
    native = {**X86, "mcpu": "znver4"}
    with pytest.raises(CompileError, match="were tuned for target .*x86-64.* builds for .*znver4"):
        tune_mod.tune_options({"tune": {"log": str(d)}}, native)
    with pytest.raises(CompileError, match="trials_per_iter: only with trials"):
        tune_mod.tune_options({"tune": {"log": str(d), "trials_per_iter": 4}}, X86)
    # the batch comes from the records' tune.json when not given
    got = tune_mod.tune_options({"tune": {"log": str(d)}}, X86)
    assert got["batch"] == 128 and got["log"] == str(d.resolve()) and not got["batch_default"]


def test_log_without_batch_needs_one(tmp_path):
    d = _records_dir(tmp_path, None)
    with pytest.raises(CompileError, match="no tune.json saying which batch"):
        tune_mod.tune_options({"tune": {"log": str(d)}}, X86)
    assert tune_mod.tune_options({"tune": {"log": str(d), "batch": 64}}, X86)["batch"] == 64


def test_default_batch_is_recorded_as_default():
    got = tune_mod.tune_options({"tune": {"trials": 40}}, X86)
    assert got == {"trials": 40, "batch": tune_mod.DEFAULT_BATCH, "batch_default": True, "seed": 0,
                   "trials_per_iter": 16, "vs_default": True, "target": X86}
    assert tune_mod.tune_options({"tune": {"trials": 5, "batch": 7}}, X86)["trials_per_iter"] == 5


def test_tuned_library_is_the_one_this_machine_loads(tmp_path):
    """With CPU variants, the tuning is for the highest variant that runs here (what load picks);
    without, for the portable library."""
    from qdeploy.backends.tvm.target import X86_LEVELS, variant_runs_here

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    info = TvmBackend().emit(_mlp(), {"tvm": {"tune": {"trials": 8}}}, tmp_path / "a")
    here = [lv for lv in info.get("cpu_variant_levels", [])
            if variant_runs_here({"mcpu": lv, "requires": list(X86_LEVELS[lv])})]
    assert info["tune"]["target"] == ({**info["target"], "mcpu": here[-1]} if here else info["target"])
    info = TvmBackend().emit(_mlp(), {"tvm": {"tune": {"trials": 8}, "cpu_variants": "none"}}, tmp_path / "b")
    assert info["tune"]["target"] == info["target"] and "cpu_variant_levels" not in info


def test_targets_that_cannot_be_tuned_here(tmp_path):
    with pytest.raises(CompileError, match="cross-compiled library cannot be measured"):
        tune_mod.tune_options({"tune": {"trials": 8}}, {**X86, "mtriple": "aarch64-linux-gnu"}, cross=True)
    with pytest.raises(CompileError, match="tvm-cuda: tvm.tune"):
        get_backend("tvm-cuda").emit(_mlp(), {"tvm": {"tune": {"trials": 8}}}, tmp_path)


def test_segfaulting_ffi_and_missing_packages_refused(monkeypatch):
    import importlib.metadata
    import importlib.util

    real_version, real_find = importlib.metadata.version, importlib.util.find_spec
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "0.1.15.post2" if name == "apache-tvm-ffi" else real_version(name))
    with pytest.raises(CompileError, match=r"apache-tvm-ffi 0.1.15.post2 crashes .*qdeploy\[tune\]"):
        tune_mod.tune_options({"tune": {"trials": 8}}, X86)
    monkeypatch.setattr(importlib.metadata, "version", real_version)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xgboost" else real_find(name, *a))
    with pytest.raises(CompileError, match="meta-schedule needs xgboost, not installed"):
        tune_mod.tune_options({"tune": {"trials": 8}}, X86)


def test_cli_tune_flags(tmp_path):
    from typer.testing import CliRunner

    from qdeploy.cli import app

    r = CliRunner().invoke(app, ["compile", "m.onnx", "-t", "hls4ml", "-o", str(tmp_path / "o"), "--tune", "8"])
    assert r.exit_code == 2 and "meta-schedule tuning is for --target tvm-llvm, not hls4ml" in r.output
    r = CliRunner().invoke(app, ["compile", "m.onnx", "-t", "tvm-llvm", "-o", str(tmp_path / "o"), "--tune", "0"])
    assert r.exit_code == 2 and "--tune" in r.output
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- static entries
def test_lower_static_entries_once_each():
    from qdeploy.backends.tvm.lower import lower

    names = sorted(gv.name_hint for gv in lower(_mlp(), batch1_entry=True, static_batches=(1, 8)).get_global_vars()
                   if gv.name_hint.startswith("main"))
    assert names == ["main", "main_b1", "main_b8"]
    with pytest.raises(ValueError, match=">= 1"):
        lower(_mlp(), static_batches=(0,))


def test_static_entry_check_catches_a_wrong_entry():
    """check_static_batches runs the golden inputs cycled to B rows and compares with the
    reference: an entry wrong only at batch B fails the check (and the exactness)."""
    g = _mlp()
    rng = np.random.default_rng(1)
    feeds = {"x": rng.integers(-128, 128, (5, 16))}
    ref = execute(g, feeds, codes=True)

    def fn(f):  # the reference, off by one code at batch 12
        out = execute(g, f, codes=True)
        if f["x"].shape[0] == 12:
            out = {k: v + (np.arange(v.shape[0]) == 3)[:, None] for k, v in out.items()}
        return out
    exact = compare_outputs(g, ref, fn(feeds))
    assert exact["bit_exact"]
    check_static_batches(exact, g, fn, feeds, [12])
    assert exact["static_batches"]["12"]["samples"] == 12 and exact["static_batches"]["12"]["mismatches"] == 1
    assert not exact["bit_exact"] and exact["fixed_mismatches"] == 1
    exact2 = compare_outputs(g, ref, fn(feeds))
    check_static_batches(exact2, g, fn, feeds, [7])
    assert exact2["bit_exact"] and exact2["static_batches"]["7"]["bit_exact"]
    # B equal to the golden batch: the golden check itself ran it; recorded, not run again
    exact3 = compare_outputs(g, ref, fn(feeds))
    check_static_batches(exact3, g, fn, feeds, [5])
    assert exact3["static_batches"]["5"] == {"samples": 5, "mismatches": 0, "fixed_mismatches": 0,
                                             "max_abs_error": 0.0, "bit_exact": True, "golden_batch": True}
    from qdeploy.report import exactness_sentence
    assert "static batch-5 entry the golden batch itself" in exactness_sentence(exact3)


def test_light_tensor_intrin_twice_in_one_process():
    """Two tunings in one process: the second stub must not register the x86 intrinsics again
    (TVM refuses a second registration), and the stub never outlives the tuning."""
    import sys

    from tvm.s_tir import TensorIntrin

    for _ in range(2):
        with tune_mod._light_tensor_intrin():
            assert TensorIntrin.get("dot_16x4_vnni") is not None
        mod = sys.modules.get("tvm.s_tir.tensor_intrin")
        assert mod is None or not getattr(mod, "__qdeploy_stub__", False)


# ---------------------------------------------------------------------------- a real tuning
@pytest.mark.slow
def test_tuned_library_exact_and_records_rebuild_it(tmp_path):
    import qdeploy
    from qdeploy.runtime import CompiledModel

    g = _mlp()
    said = []
    # vs_default false: every best record kept (whether a tuned kernel beats the default schedule
    # is a timing, not a fact a test can assert)
    res = qdeploy.compile(g, "tvm-llvm", tmp_path / "a",
                          config={"tvm": {"tune": {"trials": 8, "batch": 16, "vs_default": False}}},
                          progress=said.append)
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    t = man["backend"]["tune"]
    assert t["source"] == "tuned" and t["batch"] == 16 and 1 <= t["trials_run"] <= 8 and t["kernels_applied"] >= 1
    assert t["kernels_tuned"] == t["kernels_applied"] and t["kernels_default_faster"] == 0
    assert any("trials" in s and s.startswith("tuning") for s in said)
    assert man["exactness"]["bit_exact"] is True
    assert man["exactness"]["static_batches"]["16"] == {"samples": 16, "mismatches": 0, "fixed_mismatches": 0,
                                                        "max_abs_error": 0.0, "bit_exact": True}
    assert {f"tune/{tune_mod.WORKLOAD_FILE}", f"tune/{tune_mod.RECORD_FILE}"} <= set(man["hashes"])
    md = (tmp_path / "a" / "report.md").read_text()
    assert "tuned batch: 16" in md and f"{t['trials_run']} trials run" in md
    lib = tmp_path / "a" / man["backend"]["library"]

    # the tuned entry runs for a batch of 16 and equals the reference (fresh inputs)
    fn = TvmBackend().load(tmp_path / "a")
    assert fn.fast.entry_for(16) is fn.fast.static[16] and fn.fast.entry_for(15) is fn.fast.entry
    rng = np.random.default_rng(7)
    for n in (16, 15):
        feeds = {"x": rng.integers(-128, 128, (n, 16))}
        assert np.array_equal(fn(feeds)["d2"], execute(g, feeds, codes=True)["d2"])
    x = rng.uniform(-1, 1, (16, 16)).astype(np.float32)
    y = CompiledModel.load(tmp_path / "a").predict(x)

    # rebuild from the artifact: the stored records, no trial, the same tuned kernels and outputs
    # (the .so is not byte-stable even untuned: TVM's VM shape functions vary between builds)
    b = tmp_path / "b"
    shutil.copytree(tmp_path / "a", b)
    (b / lib.name).unlink()
    info = json.loads(json.dumps(man["backend"]))
    said.clear()
    with reporting(said.append):
        TvmBackend().build(b, info)
    assert info["tune"]["source"] == "artifact" and info["tune"]["trials_run"] == 0 and not said
    assert info["library"] == lib.name and info["tune"]["kernels_digest"] == t["kernels_digest"]
    assert np.array_equal(CompiledModel.load(b).predict(x), y)

    # a compile with tune: {log: artifact}: no trial, the same library and outputs
    res2 = qdeploy.compile(g, "tvm-llvm", tmp_path / "c", config={"tvm": {"tune": {"log": str(tmp_path / "a")}}})
    t2 = res2.report["backend"]["tune"]
    assert t2["source"] == "log" and t2["trials_run"] == 0 and t2["batch"] == 16
    assert res2.report["backend"]["library"] == lib.name and t2["kernels_digest"] == t["kernels_digest"]
    assert np.array_equal(CompiledModel.load(tmp_path / "c").predict(x), y)

    # the default-schedule comparison (vs_default, the default): every tuned kernel is either kept
    # or dropped, and exactly the kept ones have a record; a compile with them is exact
    from tvm.s_tir import meta_schedule as ms

    src = tmp_path / "a" / "tune"
    db = ms.database.JSONDatabase(path_workload=str(src / tune_mod.WORKLOAD_FILE),
                                  path_tuning_record=str(src / tune_mod.RECORD_FILE), allow_missing=False)
    mods = list({r.workload.mod.script(): r.workload.mod for r in db.get_all_tuning_records()}.values())
    dest = tmp_path / "kept"
    tgt = tvm.target.Target({**t["target"], "num-cores": 1})
    builder, runner = tune_mod._in_process_builder(), ms.runner.LocalRunner()
    kept, dropped = tune_mod.keep_faster(src, dest, mods, tgt, builder, runner)
    assert kept + dropped == len(mods) == t["kernels_tuned"] and tune_mod.record_count(dest) == kept
    # the comparison measures both schedules now: the tuned trace re-applied, and the default
    from qdeploy.backends.tvm.tune_keep import measure_now
    top = db.get_top_k(db.commit_workload(mods[0]), 1)[0]
    d_now, t_now = measure_now(mods[0], top.trace, tgt, builder, runner, rounds=2)
    assert d_now is not None and t_now is not None and d_now > 0 and t_now > 0
    (dest / tune_mod.META_FILE).write_text((src / tune_mod.META_FILE).read_text())
    res3 = qdeploy.compile(g, "tvm-llvm", tmp_path / "e", config={"tvm": {"tune": {"log": str(dest)}}})
    assert res3.report["exactness"]["bit_exact"] and res3.report["backend"]["tune"]["kernels_applied"] == kept

    # records of another model (no kernel in common) match none of its kernels: refused, nothing written
    with pytest.raises(CompileError, match="none of the tuning records"):
        qdeploy.compile(_mlp(seed=1, hidden=24, inputs=12), "tvm-llvm", tmp_path / "d",
                        config={"tvm": {"tune": {"log": str(tmp_path / "a")}}})
    assert not (tmp_path / "d").exists()
    assert res.report["exactness"]["bit_exact"]


def test_batch1_entry_is_checked_row_by_row(tmp_path):
    """The batch-1 entry (what predict calls for one sample) is part of the compile's check: every
    golden row (up to 64) runs alone; an entry wrong on one row fails it."""
    g = _mlp()
    rng = np.random.default_rng(2)
    feeds = {"x": rng.integers(-128, 128, (9, 16))}
    ref = execute(g, feeds, codes=True)
    calls = []

    def fn(f):  # the reference, off by one code when called alone on golden row 4
        calls.append(f["x"].shape[0])
        out = execute(g, f, codes=True)
        if f["x"].shape[0] == 1 and np.array_equal(f["x"][0], feeds["x"][4]):
            out = {k: v + 1 for k, v in out.items()}
        return out
    exact = compare_outputs(g, ref, fn(feeds))
    check_static_batches(exact, g, fn, feeds, static_batch_sizes({"batch1_entry": True}))
    assert calls[1:] == [1] * 9 and exact["static_batches"]["1"]["samples"] == 9
    assert exact["static_batches"]["1"]["mismatches"] == 1 and not exact["bit_exact"]
    res = qdeploy.compile(g, "tvm-llvm", tmp_path / "a", golden=feeds["x"] / 128.0, source_check=False)
    assert res.report["exactness"]["static_batches"]["1"]["bit_exact"]
