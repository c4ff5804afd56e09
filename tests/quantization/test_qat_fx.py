"""QAT of non-Sequential models (compiler/quantization/qat_fx.py): the torch.fx rewrite, the ties it
imposes, and `qdeploy search` end to end on the MNIST-1D residual 1-D CNN recipe (tiny size) with the
chosen QONNX compiled to the reference, tvm-llvm and hls4ml targets."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import qdeploy
from qdeploy.cli import app
from qdeploy.compiler.errors import QDeployError, UnsupportedError
from qdeploy.compiler.quantization import hessian, qat, qat_fx
from qdeploy.compiler.quantization.search import check_ties, layer_specs

RECIPE_PY = Path(__file__).resolve().parents[2] / "examples" / "mnist1d" / "search_recipe.py"


def _examples():
    spec = importlib.util.spec_from_file_location("mnist1d_recipe_example", RECIPE_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_rescnn_recipe():
    """The MNIST-1D residual CNN recipe at 4/8 channels, 400 training samples, 3 float epochs, 1 QAT epoch."""
    return _examples().recipe_rescnn(width=4, epochs=3, qat_epochs=1, n_train=400, n_test=200)


class Branchy(nn.Module):
    """Two branches reading the input, a BN to fold, a concatenation feeding a Linear directly, a
    functional ReLU, and a residual add whose operands are two Linear outputs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 8)
        self.bn = nn.BatchNorm1d(8)
        self.b = nn.Linear(12, 8)
        self.mix = nn.Linear(16, 8)
        self.skip = nn.Linear(8, 8)
        self.out = nn.Linear(8, 5)

    def forward(self, x):
        ha = nn.functional.relu(self.bn(self.a(x)))
        hb = torch.relu(self.b(x))
        m = self.mix(torch.cat([ha, hb], 1))  # reads a concatenation: requantized before `mix`
        h = torch.relu(m + self.skip(ha))
        return self.out(h)


@pytest.fixture(scope="module")
def branchy():
    torch.manual_seed(0)
    m = Branchy()
    rng = np.random.default_rng(0)
    x = (np.round(rng.normal(size=(256, 12)) * 16) / 16).clip(-8, 7.9375).astype(np.float32)
    y = (x[:, :5].argmax(1)).astype(np.int64)
    qat.fine_tune(m, x, y, epochs=3, lr=1e-2)  # trains the BN statistics too
    return m, x, y


def test_input_layers_and_required_ties(branchy):
    m, x, _ = branchy
    assert sorted(qat_fx.input_layers(m)) == ["a", "b"]
    # `mix` and `skip` are added; `skip` and `mix` read different tensors -> one group from the add
    assert [sorted(g) for g in qat_fx.required_ties(m)] == [["mix", "skip"]]
    specs = {s.name: s for s in layer_specs(m, x[:1], a_bits=(3, 4, 8))}
    assert specs["a"].a_bits == () and specs["b"].a_bits == () and specs["a"].fixed_a_bits == 8
    assert specs["mix"].a_bits == (3, 4, 8) and specs["out"].a_bits == (3, 4, 8)
    # the search merges user ties with the required ones
    assert sorted(map(sorted, check_ties(m, [["out", "skip"]]))) == [["mix", "out", "skip"]]
    assert check_ties(nn.Sequential(nn.Linear(2, 2)), []) == []


def test_fx_qat_model_matches_float_at_high_bits_and_compiles_exact(branchy, tmp_path):
    m, x, y = branchy
    before = {k: v.clone() for k, v in m.state_dict().items()}
    # 8 bits (not more: Int16Bias biases have scale = input scale * weight scale, so at 12/12 bits
    # their 16-bit range is below 0.01 and the biases clip -- in the Sequential builder too)
    bits = {n: (8, 8) for n, _ in hessian.weight_layers(m)}
    q = qat.build_qat_model(m, bits, input_bits=8, input_scale=2.0 ** -4, input_signed=True, calibration_x=x)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # float model untouched
    names = dict(q.named_modules())
    for n in bits:  # weight layers keep their names (the allocation keys) and become Brevitas layers
        assert type(names[n]).__name__.startswith("Quant") and names[n].weight_quant.bit_width() == 8
    assert "bn" not in names  # folded
    # 8-bit everything: the quantized model follows the float one closely (BN folded correctly)
    pf, pq = qat.predict(m, x), qat.predict(q, x)
    assert np.max(np.abs(pf - pq)) < 0.05 * np.max(np.abs(pf))
    # low bits, fine-tuned, exported: the compiled artifact equals the Brevitas model bit for bit
    low = {"a": (4, 8), "b": (3, 8), "mix": (4, 3), "skip": (4, 3), "out": (5, 4)}
    q = qat.build_qat_model(m, low, input_bits=8, input_scale=2.0 ** -4, input_signed=True, calibration_x=x)
    qat.fine_tune(q, x, y, epochs=1, lr=3e-3)
    p = qat.export_qonnx(q, x[:1], tmp_path / "b.onnx")
    res = qdeploy.compile(str(p), target="reference", out_dir=tmp_path / "c", golden=x[:64])
    assert res.report["exactness"]["bit_exact"] and res.report["fidelity"]["real_mismatches"] == 0
    got = np.asarray(qdeploy.CompiledModel.load(tmp_path / "c").predict(x[:64]))
    assert np.max(np.abs(got - qat.predict(q, x[:64]))) < 1e-5


def test_fx_builder_refusals(branchy):
    m, x, _ = branchy
    bits = {n: (4, 4) for n, _ in hessian.weight_layers(m)}
    with pytest.raises(QDeployError, match="no bit widths given for layer 'out'"):
        qat.build_qat_model(m, {k: v for k, v in bits.items() if k != "out"})

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, x):
            return self.l(torch.relu(self.l(x)))

    with pytest.raises(UnsupportedError, match="run more than once"):
        qat.build_qat_model(Shared(), {"l": (4, 4)})

    class Flow(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, x):
            return self.l(x) if x.sum() > 0 else x

    with pytest.raises(UnsupportedError, match="cannot be traced by torch.fx"):
        qat.build_qat_model(Flow(), {"l": (4, 4)})

    class Gelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.l, self.g = nn.Linear(4, 4), nn.GELU()

        def forward(self, x):
            return self.g(self.l(x))

    with pytest.raises(UnsupportedError, match="node 'g': GELU is not supported"):
        qat.build_qat_model(Gelu(), {"l": (4, 4)})

    class TwoReaders(nn.Module):  # two layers reading one ReLU output must share its bits
        def __init__(self):
            super().__init__()
            self.l, self.p, self.q = nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x):
            h = torch.relu(self.l(x))
            return self.p(h) + self.q(h)

    assert qat_fx.required_ties(TwoReaders()) == [["p", "q"]]
    with pytest.raises(QDeployError, match=r"p \(3 bits\), q \(4 bits\) read the same"):
        qat.build_qat_model(TwoReaders(), {"l": (4, 8), "p": (4, 3), "q": (4, 4)})


@pytest.mark.slow  # ~70 s: two Brevitas QONNX exports (~8 s each), Hutchinson probes, an hls4ml C simulation
def test_search_residual_cnn_end_to_end_compiles_to_all_targets(tmp_path):
    out = tmp_path / "s"
    r = CliRunner().invoke(app, ["search", f"{__file__}:tiny_rescnn_recipe", "-o", str(out),
                                 "--budget", "bops=uniform:4", "--probes", "10", "--bits", "3,4,6",
                                 "--act-bits", "3,4,6", "--no-progress"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "search_report.json").read_text())
    assert rep["model"] == "mnist1d_rescnn" and rep["trace"]["method"] == "hutchinson"
    # HAWQ-V3's constraints: b2c1 and b2proj read one tensor; b2proj and b2c2 meet at an add
    assert sorted(map(sorted, rep["settings"]["ties"])) == [["b2c1", "b2c2", "b2proj"]]
    h = rep["budgets"][0]["hessian"]
    tied = {(h["bits"][n]["w"], h["bits"][n]["a"]) for n in ("b2c1", "b2c2", "b2proj")}
    assert len(tied) == 1
    assert h["bits"]["stem"]["a"] == 8  # the stem reads the model input: its 8-bit format, not searched
    assert h["costs"]["bops"] <= rep["budgets"][0]["budget_resolved"]["bops"] * (1 + 1e-9)
    onnx_path = out / h["qonnx"]
    x_val = tiny_rescnn_recipe()["val"][0][:32]
    for target in ("reference", "tvm-llvm", "hls4ml"):
        res = qdeploy.compile(str(onnx_path), target=target, out_dir=tmp_path / target, golden=x_val)
        assert res.report["exactness"]["bit_exact"], target
        assert res.report["exactness"]["samples"] == 32 and res.report["fidelity"]["real_mismatches"] == 0, target


def test_sequential_holding_a_residual_block_goes_through_fx():
    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c = nn.Conv1d(c, c, 3, padding=1)

        def forward(self, x):
            return torch.relu(x + self.c(x))

    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), Block(4), nn.Flatten(), nn.Linear(32, 3))
    x = (np.round(np.random.default_rng(1).normal(size=(64, 1, 8)) * 16) / 16).astype(np.float32)
    bits = {"0": (8, 8), "2.c": (8, 8), "4": (8, 8)}
    assert sorted(bits) == sorted(n for n, _ in hessian.weight_layers(m))
    specs = {s.name: s for s in layer_specs(m, x[:1], a_bits=(4, 8))}
    assert specs["0"].a_bits == () and specs["2.c"].a_bits == (4, 8)
    q = qat.build_qat_model(m, bits, input_bits=8, input_scale=2.0 ** -4, input_signed=True, calibration_x=x)
    assert not isinstance(q, nn.Sequential) and type(dict(q.named_modules())["2.c"]).__name__ == "QuantConv1d"
    pf, pq = qat.predict(m, x), qat.predict(q, x)
    assert np.max(np.abs(pf - pq)) < 0.05 * np.max(np.abs(pf))
