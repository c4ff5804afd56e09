"""The torch.fx op table (``compiler/frontends/fx_rules.py``) and the block converter
(``fx_to_ir.block_to_ir``) on small captured blocks: which nodes become IR ops, which stay on the
host, and that the device graph computes what the block computes."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from qdeploy.compiler.frontends.ast_capture import capture  # noqa: E402
from qdeploy.compiler.frontends.fx_rules import FUNCTION_RULES, as_pair, module_rules  # noqa: E402
from qdeploy.compiler.frontends.fx_to_ir import block_to_ir  # noqa: E402
from qdeploy.compiler.ir.layout import NCHW, PLAIN, from_ir, layout_of, to_ir  # noqa: E402
from qdeploy.compiler.reference import execute  # noqa: E402


class _Straight(nn.Module):
    """Conv -> BN -> ReLU -> pool -> flatten -> Linear, a per-channel constant add, a host op."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(3 * 2 * 2, 5)
        self.register_buffer("shift", torch.arange(3, dtype=torch.float32).reshape(1, 3, 1, 1))

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)) + self.shift)
        h = self.pool(h).flatten(1)
        y = self.fc(h) * 0.5
        s = torch.sigmoid(y)
        return y, s


def _block(model, x):
    prog = capture(model.eval(), x)
    (blk,) = prog.blocks()
    return blk, block_to_ir(blk, "t")


def test_block_ops_host_ops_and_values():
    torch.manual_seed(0)
    m = _Straight()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 2, 4, 4)
    blk, bir = _block(m, x)
    ops = [n.op for n in bir.graph.nodes]
    # conv, bn (Affine), +shift (Affine with per-channel bias), relu, maxpool, flatten
    # (Transpose + Reshape), fc (Dense), *0.5 (Affine)
    assert ops == ["Conv", "Affine", "Affine", "Relu", "MaxPool", "Transpose", "Reshape", "Dense", "Affine"]
    assert bir.host_ops == ["sigmoid"]
    assert [k for _, _, k in bir.dev_inputs] == [NCHW]
    # the device graph, run by the reference interpreter in IR layout, equals the block's torch value
    (inp,) = bir.graph.inputs
    (out,) = bir.graph.outputs
    got = execute(bir.graph, {inp: to_ir(x.numpy())})[out]
    with torch.no_grad():
        want = m(x)[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_rules_return_none_outside_what_they_map():
    class Dilated(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, dilation=2, padding=2)

        def forward(self, x):
            return torch.relu(self.conv(x))

    _, bir = _block(Dilated(), torch.randn(1, 2, 6, 6))
    # a dilated conv is not mapped, so it runs on the host and so does what reads it
    assert bir.graph is None and bir.host_ops == ["Conv2d", "relu"]


def test_tables_and_layout_helpers():
    assert {"relu", "view", "reshape", "cat", "add", "neg", "mean", "softmax"} <= set(FUNCTION_RULES)
    types = [t for ts, _ in module_rules() for t in (ts if isinstance(ts, tuple) else (ts,))]
    assert nn.Conv2d in types and nn.Linear in types and nn.BatchNorm1d in types
    assert as_pair(3) == (3, 3) and as_pair([1, 2]) == (1, 2)
    assert layout_of(4) == NCHW and layout_of(2) == PLAIN and layout_of(3) is None
    a = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    assert to_ir(a).shape == (2, 4, 5, 3) and np.array_equal(from_ir(to_ir(a), NCHW), a)
    assert from_ir(a[:, :, 0, 0], PLAIN) is not None and to_ir(a[:, :, 0, 0]).shape == (2, 3)
