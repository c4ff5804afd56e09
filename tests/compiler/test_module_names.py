"""PyTorch module names carried from a Brevitas model into the IR, the report and per-layer hls4ml
settings (issue #16: "per-layer settings keyed by IR node name or by the user's module name";
"module names carried from PyTorch/Brevitas where the source has them").

Oracle for the names: the module's own ``named_modules()``; for the settings: the same estimate
keyed by IR node names."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import qdeploy
from qdeploy.compiler.errors import QDeployError
from qdeploy.compiler.ir.modules import node_keyed

brevitas = pytest.importorskip("brevitas")
import brevitas.nn as qnn  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = qnn.QuantIdentity(bit_width=8, return_quant_tensor=True)
        self.fc1 = qnn.QuantLinear(16, 24, bias=True, weight_bit_width=4)
        self.act1 = qnn.QuantReLU(bit_width=6, return_quant_tensor=True)
        self.head = qnn.QuantLinear(24, 5, bias=True, weight_bit_width=4)

    def forward(self, x):
        return self.head(self.act1(self.fc1(self.inp(x))))


@pytest.fixture(scope="module")
def graph():
    m = Tagger().eval()
    g = qdeploy.api.load(m, torch.zeros(1, 16))
    return m, g


def test_import_records_module_names(graph):
    m, g = graph
    mods = g.meta["modules"]
    own = {n for n, _ in m.named_modules() if n}
    assert set(mods.values()) <= own
    dense = [n.name for n in g.nodes if n.op == "Dense"]
    assert [mods[d] for d in dense] == ["fc1", "head"]


def test_report_shows_modules(graph, tmp_path):
    _, g = graph
    res = qdeploy.compile(g, "reference", tmp_path / "r", source_check=False)
    rows = {r["name"]: r for r in res.report["layers"]}
    dense = [n.name for n in g.nodes if n.op == "Dense"]
    assert [rows[d]["module"] for d in dense] == ["fc1", "head"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| node | module | op |" in md and "| fc1 | Dense |" in md


def test_reuse_factor_by_module_name_equals_by_node_name(graph):
    _, g = graph
    dense = [n.name for n in g.nodes if n.op == "Dense"]
    by_mod = qdeploy.estimate(g, "hls4ml", {"reuse_factor": {"fc1": 4, "default": 2}, "strategy": "Resource"})
    by_node = qdeploy.estimate(g, "hls4ml", {"reuse_factor": {dense[0]: 4, "default": 2}, "strategy": "Resource"})
    assert by_mod["reuse_factors"] == by_node["reuse_factors"]
    assert by_mod["reuse_factors"][dense[0]]["requested"] == 4 and by_mod["reuse_factors"][dense[1]]["requested"] == 2
    assert by_mod["total"] == by_node["total"]
    with pytest.raises(QDeployError, match=r"unknown node\(s\) \['fc9'\].*their modules: \['fc1', 'head'\]"):
        qdeploy.estimate(g, "hls4ml", {"reuse_factor": {"fc9": 4}})


def test_node_keyed_rules(graph):
    _, g = graph
    dense = [n.name for n in g.nodes if n.op == "Dense"]
    # an explicit node name wins over its module's entry; unknown keys stay for the caller's check
    assert node_keyed({"fc1": 4, dense[0]: 8, "x": 1, "default": 3}, g, dense) == {dense[0]: 8, "x": 1, "default": 3}
    assert node_keyed(5, g) == 5
    np.testing.assert_equal(node_keyed({"head": 2}, g, dense), {dense[1]: 2})


def test_example_input_with_a_batch_exports_one_sample():
    """A batch of 8 as the example input of a Brevitas CNN with a flatten (the exporter used to bake
    the 8 into the Reshape, and the compile failed): the graph equals the batch-1 import."""
    torch.manual_seed(1)
    m = nn.Sequential(qnn.QuantIdentity(bit_width=8, return_quant_tensor=True),
                      qnn.QuantConv2d(1, 4, 3, padding=1, weight_bit_width=4),
                      qnn.QuantReLU(bit_width=4, return_quant_tensor=True), nn.Flatten(),
                      qnn.QuantLinear(4 * 6 * 6, 3, bias=True, weight_bit_width=4)).eval()
    g8 = qdeploy.api.load(m, torch.randn(8, 1, 6, 6))
    g1 = qdeploy.api.load(m, torch.randn(1, 1, 6, 6))
    assert g8.digest() == g1.digest()
