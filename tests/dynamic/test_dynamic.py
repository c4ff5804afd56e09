"""Dynamic subgraph extraction (capture -> blocks + conditions -> compiled blocks, host
control).  Every test model's compiled program equals eager PyTorch on random inputs taking
different branches; plain ``torch.jit.trace`` does not."""
from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qdeploy.compiler.frontends.ast_capture import capture  # noqa: E402
from qdeploy.compiler.frontends.program import CaptureError  # noqa: E402
from qdeploy.dynamic import compile_dynamic, render_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _models():
    name = "qdeploy_dynamic_example_models"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "dynamic" / "models.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


M = _models()
N = 200
_CACHE: dict = {}


def built(name):
    if name not in _CACHE:
        _CACHE[name] = M.build(name, n_blocks=3)
    return _CACHE[name]


_REF: dict = {}


def eager_ref(name, X, seed):
    if (name, seed) not in _REF:
        _REF[name, seed] = eager(built(name)[0], X)
    return _REF[name, seed]


def eager(model, X):
    with torch.no_grad():
        return torch.cat([model(X[i:i + 1]) for i in range(len(X))]).numpy()


@pytest.fixture(scope="module")
def compiled():
    cache = {}

    def get(name, target):
        if (name, target) not in cache:
            m, ex, _ = built(name)
            cache[name, target] = compile_dynamic(m, ex, target=target)
        return cache[name, target]
    return get


@pytest.mark.parametrize("target", ["reference", "tvm-llvm"])
@pytest.mark.parametrize("name", M.MODELS)
def test_matches_eager(compiled, name, target):
    m, _, gen = built(name)
    dm = compiled(name, target)
    X = gen(N, 7)
    ref = eager_ref(name, X, 7)
    y = dm.run(X)  # batched: samples routed per condition
    assert np.abs(y - ref).max() < 1e-4
    assert (y.argmax(1) == ref.argmax(1)).all()
    taken = dm.last_stats["taken"]
    # the inputs exercise both sides of (almost) every condition
    both = sum(1 for t, f in taken.values() if t and f)
    assert both >= max(1, len(taken) - 1), taken
    y1 = np.concatenate([dm.run(X[i:i + 1]) for i in range(16)])  # batch 1, as eager runs
    assert np.abs(y1 - ref[:16]).max() < 1e-4


@pytest.mark.parametrize("name", ["moe", "skipnet", "cond_gate"])
def test_batch1_fast_paths(compiled, name):
    """Single samples (torch tensors: generated host code + static batch-1 entries; numpy
    arrays: the same steps fed from numpy) agree with eager and with each other, branch
    statistics included; every tvm-llvm block step is generated code."""
    _, _, gen = built(name)
    dm = compiled(name, "tvm-llvm")
    X = gen(N, 7)
    ref = eager_ref(name, X, 7)
    yt, yn, taken = [], [], {}
    for i in range(64):
        yt.append(dm.run(X[i:i + 1]))
        for k, (t, f) in dm.last_stats["taken"].items():
            acc = taken.setdefault(k, [0, 0])
            acc[0] += t
            acc[1] += f
        yn.append(dm.run(X[i:i + 1].numpy()))
    yt, yn = np.concatenate(yt), np.concatenate(yn)
    assert yt.shape == ref[:64].shape and yt.dtype == np.float32
    assert np.abs(yt - ref[:64]).max() < 1e-4 and (yt.argmax(1) == ref[:64].argmax(1)).all()
    assert np.array_equal(yt, yn)
    dm.run(X[:64])  # batched routing counts the same branch decisions
    assert {k: list(v) for k, v in dm.last_stats["taken"].items()} == taken
    assert all(hasattr(dm._block_step(b), "source") for b in dm.program.blocks())


def test_shallow_deep_digits(compiled):
    m, _, _ = built("shallow_deep")
    _, (Xte, yte) = M.train_shallow_deep(0)
    dm = compiled("shallow_deep", "tvm-llvm")
    ref = eager(m, Xte)
    y = dm.run(Xte)
    assert np.abs(y - ref).max() < 1e-4 and (y.argmax(1) == ref.argmax(1)).all()
    exits = dm.last_stats["returns"]
    assert len(exits) >= 2, exits  # early and late exits both used
    assert (y.argmax(1) == yte.numpy()).mean() > 0.8


@pytest.mark.parametrize("name", ["shallow_deep", "skipnet", "blockdrop", "moe"])
def test_plain_trace_is_inconsistent(compiled, name):
    """torch.jit.trace freezes the branch of its example input; the compiled program does not."""
    m, ex, gen = built(name)
    X = gen(N, 7)
    ref = eager_ref(name, X, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(m, ex)
    with torch.no_grad():
        yt = torch.cat([traced(X[i:i + 1]) for i in range(N)]).numpy()
    wrong = np.abs(yt - ref).max(axis=1) > 1e-4
    assert wrong.mean() > 0.05, wrong.mean()
    y = compiled(name, "reference").run(X)
    assert (np.abs(y - ref).max(axis=1) < 1e-4).all()


def test_report_counts(compiled):
    dm = compiled("skipnet", "reference")
    r = dm.report
    assert r["conditions"] == 3 and r["blocks"] == 7 and r["device_blocks"] == 7
    assert r["unrolled_loops"] == [{"line": r["unrolled_loops"][0]["line"], "trips": 3}]
    assert all("compile_seconds" in b for b in r["per_block"])
    text = render_report(r)
    assert "3 conditions" in text and "sigmoid" in text
    assert not r["fidelity"]["checked"] and "fidelity vs source: NOT checked: compile_dynamic takes no golden" in text
    bd = compiled("blockdrop", "reference").report
    assert len(bd["removed_from_device"]) == 2  # blocks that only index the keep mask stay on the host


class Specialized(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.use_bias_path = False
        self.register_buffer("scale", torch.tensor([1.0, 2.0, 3.0, 4.0]))

    def forward(self, x):
        if self.use_bias_path:
            x = x + 1
        y = self.fc(x) * (self.scale * 2)
        if y.sum() > 0:
            return y
        return x - y


def test_specialization_and_folding():
    m = Specialized().eval()
    dm = compile_dynamic(m, torch.randn(1, 4), target="reference")
    r = dm.report
    assert r["specialized"] and r["specializations"][0]["value"] is False
    assert r["folded_constants"] >= 1  # self.scale * 2 (FX evaluates it at trace time)
    g = dm.blocks[dm.program.blocks()[0].id][0].graph
    aff = [n for n in g.nodes if n.op == "Affine"]
    assert aff and np.allclose(aff[0].params["scale"].data, [2, 4, 6, 8])
    X = torch.randn(64, 4)
    assert np.abs(dm.run(X) - eager(m, X)).max() < 1e-5
    assert all(v for v in dm.last_stats["taken"].values())


def _err(src_fn):
    ns = {"torch": torch}
    exec(src_fn, ns)  # noqa: S102
    cls = ns["Bad"]
    return cls


BAD = {
    "while": ("    def forward(self, x):\n        while x.sum() > 0:\n            x = x - 1\n        return x\n",
              "while", 2),
    "data_range": ("    def forward(self, x):\n        n = int(x.sum())\n        for i in range(n):\n"
                   "            x = x + 1\n        return x\n", "trip count depends on data", 3),
    "recursion": ("    def forward(self, x):\n        if x.sum() > 0:\n            return self(x - 1)\n        return x\n",
                  "recursion", 3),
    "global": ("    def forward(self, x):\n        global COUNT\n        return x\n", "global", 2),
    "attr": ("    def forward(self, x):\n        self.last = x\n        return x\n", "side effect", 2),
    "print": ("    def forward(self, x):\n        print(x)\n        return x\n", "side effect", 2),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_unsupported_dynamism_names_line(tmp_path, case):
    body, words, rel = BAD[case]
    f = tmp_path / f"bad_{case}.py"
    f.write_text("import torch\n\n\nclass Bad(torch.nn.Module):\n" + body)
    spec = importlib.util.spec_from_file_location(f"bad_{case}", f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(CaptureError) as ei:
        capture(mod.Bad().eval(), torch.randn(1, 4))
    msg = str(ei.value)
    assert words in msg and f"bad_{case}.py:{4 + rel}" in msg, msg


def test_hls4ml_refuses_float_blocks_with_a_clear_error():
    """Dynamic blocks are float32 (quantized blocks are not supported yet); hls4ml needs fixed-point
    layers, so compiling them for hls4ml fails up front with one message naming the block's node."""
    from qdeploy.compiler.errors import UnsupportedError
    m, ex, _ = built("moe")
    with pytest.raises(UnsupportedError) as ei:
        compile_dynamic(m, ex, target="hls4ml")
    msg = str(ei.value)
    assert "no fixed-point layers" in msg and "tvm-llvm" in msg and "\n" not in msg


def test_failed_dynamic_compile_leaves_no_directory(tmp_path):
    from qdeploy.compiler.errors import QDeployError, UnsupportedError
    m, ex, _ = built("moe")
    out = tmp_path / "moe_hls"
    with pytest.raises(UnsupportedError):
        compile_dynamic(m, ex, target="hls4ml", out_dir=out)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no staging leftovers either
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(QDeployError, match="not a qdeploy dynamic program"):
        compile_dynamic(m, ex, target="reference", out_dir=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    dm = compile_dynamic(m, ex, target="reference", out_dir=out)  # success publishes the program
    assert (out / "plan.json").is_file() and dm.report["out_dir"] == str(out.resolve())
    X = built("moe")[2](20, 5)
    assert np.abs(dm.run(X) - eager(m, X)).max() < 1e-4


# --------------------------------------------------------------------------- torch.export capture
@pytest.mark.parametrize("target", ["reference", "tvm-llvm"])
def test_cond_gate_captured_with_torch_export(compiled, target):
    """CondGate uses torch.cond and no plain data-dependent `if`: it is captured from the
    torch.export graph (higher_order.cond node -> condition, branch subgraphs -> blocks) and
    agrees with eager on 200 random inputs taking both branches."""
    dm = compiled("cond_gate", target)
    assert dm.report["capture"] == "torch.export" and dm.program.capture == "torch.export"
    assert "capture torch.export" in render_report(dm.report)
    assert dm.report["conditions"] == 1
    # the condition points at the torch.cond line of CondGate.forward
    src = Path(M.__file__).read_text().splitlines()
    assert "torch.cond(" in src[dm.program.conditions()[0].line - 1]
    X = built("cond_gate")[2](N, 7)
    ref = eager_ref("cond_gate", X, 7)
    y = dm.run(X)
    assert np.abs(y - ref).max() < 1e-4 and (y.argmax(1) == ref.argmax(1)).all()
    (t, f), = dm.last_stats["taken"].values()
    assert t > 20 and f > 20


@pytest.mark.parametrize("target", ["reference", "tvm-llvm"])
def test_nested_and_sequential_torch_cond(target):
    """Two sequential torch.cond, the second with a nested torch.cond in its true branch:
    3 conditions, every side taken on 200 inputs, 100% agreement with eager (batched and batch 1)."""
    m, ex, gen = M.build("cond_nested")
    dm = compile_dynamic(m, ex, target=target)
    r = dm.report
    assert r["capture"] == "torch.export" and r["conditions"] == 3 and r["returns"] == 1
    X = gen(N, 7)
    ref = eager(m, X)
    y = dm.run(X)
    assert np.abs(y - ref).max() < 1e-4 and (y.argmax(1) == ref.argmax(1)).all()
    taken = dm.last_stats["taken"]
    assert len(taken) == 3 and all(t > 0 and f > 0 for t, f in taken.values()), taken
    y1 = np.concatenate([dm.run(X[i:i + 1]) for i in range(24)])
    assert np.abs(y1 - ref[:24]).max() < 1e-4


def test_capture_paths_ast_fallback(tmp_path):
    """Plain-`if` models and models mixing a data-dependent `if` with torch.cond use the ast
    path; method='ast' forces it for a torch.cond model; both paths agree with eager."""
    f = tmp_path / "mixed_cond.py"
    f.write_text(
        "import torch\n\n\nclass Mixed(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.fc = torch.nn.Linear(6, 6)\n\n"
        "    def double(self, h):\n        return h * 2.0\n\n"
        "    def neg(self, h):\n        return -h\n\n"
        "    def forward(self, x):\n        h = self.fc(x)\n"
        "        if h.sum() > 0:\n            h = h + 1.0\n"
        "        y = torch.cond(h.mean() > 0.5, self.double, self.neg, (h,))\n        return y\n")
    spec = importlib.util.spec_from_file_location("mixed_cond", f)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["mixed_cond"] = mod
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    m = mod.Mixed().eval()
    X = torch.randn(64, 6)
    prog = capture(m, X[:1])
    assert prog.capture == "ast" and len(prog.conditions()) == 2
    dm = compile_dynamic(m, X[:1], target="reference")
    assert dm.report["capture"] == "ast"
    assert np.abs(dm.run(X) - eager(m, X)).max() < 1e-5
    assert all(t and f for t, f in dm.last_stats["taken"].values()), dm.last_stats["taken"]
    assert capture(built("skipnet")[0], built("skipnet")[1]).capture == "ast"
    cg, ex, gen = built("cond_gate")
    dm_ast = compile_dynamic(cg, ex, target="reference", capture_method="ast")
    assert dm_ast.report["capture"] == "ast"
    X = gen(64, 3)
    assert np.abs(dm_ast.run(X) - eager(cg, X)).max() < 1e-4
    with pytest.raises(ValueError):
        capture(cg, ex, method="dycl")


# --------------------------------------------------------------------------- shared runtime
def test_shared_stage_host_and_plan_roundtrip(tmp_path):
    """DynamicModel and MultiStageModel share StageHost (stage calls by name, routing, plan.json
    + stage artifacts).  A compiled dynamic network is saved as plan.json (kind "dynamic") and
    one artifact per device block plus the host program, reloads from the directory alone (no
    model, nothing recompiled or re-captured) and gives the same outputs; a block artifact that
    no longer matches the plan is refused."""
    from qdeploy.runtime.dynamic import DynamicModel
    from qdeploy.runtime.multistage import MultiStageModel, PlanError, StageHost, read_plan

    assert issubclass(DynamicModel, StageHost) and issubclass(MultiStageModel, StageHost)
    m, ex, gen = built("cond_gate")
    dm = compile_dynamic(m, ex, target="reference", out_dir=tmp_path)
    plan = read_plan(tmp_path, "dynamic")
    assert plan["capture"] == "torch.export"
    assert sorted(s["name"] for s in plan["stages"]) == sorted(dm.stages)
    assert len(dm.stages) == dm.report["device_blocks"] == 3
    X = gen(64, 5)
    y = dm.run(X)
    assert dm.stage_calls == dm.last_stats["block_calls"] > 0  # routed path: every device call via call_stage
    dm2 = DynamicModel.load(tmp_path)
    assert dm2.report == dm.report and [type(i).__name__ for i in dm2.program.items] == \
        [type(i).__name__ for i in dm.program.items]
    assert np.array_equal(dm2.run(X), y) and dm2.stage_calls == dm.stage_calls
    assert np.array_equal(dm2.run(X[:1]), y[:1])
    rows_t, rows_f = StageHost.route(np.arange(5), np.array([1, 0, 1, 1, 0]))
    assert rows_t.tolist() == [0, 2, 3] and rows_f.tolist() == [1, 4]
    with pytest.raises(PlanError):
        read_plan(tmp_path, "early_exit")
    import json
    saved = (tmp_path / "plan.json").read_text()
    plan["stages"][0]["graph_digest"] = "0" * 16  # an artifact that is not the one the plan was made with
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(PlanError, match="differs"):
        DynamicModel.load(tmp_path)
    (tmp_path / "plan.json").write_text(saved)
    (tmp_path / "host.pt").unlink()
    with pytest.raises(PlanError, match="host.pt"):
        DynamicModel.load(tmp_path)


@pytest.mark.parametrize("name", M.MODELS)
def test_reload_from_saved_plan_matches(compiled, name):
    """Every example model reloads from its program directory alone (plan.json + host.pt + block
    artifacts): the host ops rebuilt from host.pt give bit-identical outputs and the same branch
    statistics on a batch and on single samples, and the runtime never saw the model."""
    from qdeploy.runtime.dynamic import DynamicModel
    from qdeploy.runtime.dynamic.plan import HostBlock

    dm = compiled(name, "reference")
    dm2 = DynamicModel.load(dm.workdir)
    assert all(isinstance(b, HostBlock) for b, _fn in dm2.blocks.values())
    assert sorted(dm2.stages) == sorted(dm.stages)
    assert [b.host_ops for b, _ in dm2.blocks.values()] == [b.host_ops for b, _ in dm.blocks.values()]
    _, _, gen = built(name)
    X = gen(32, 11)
    assert np.array_equal(dm2.run(X), dm.run(X))
    assert dm2.last_stats == dm.last_stats
    for i in range(3):
        assert np.array_equal(dm2.run(X[i:i + 1]), dm.run(X[i:i + 1]))
        assert dm2.last_stats == dm.last_stats
