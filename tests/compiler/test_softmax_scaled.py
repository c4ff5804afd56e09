"""A Brevitas model with default (float-scale) quantizers ending in ``nn.Softmax``: the Softmax reads
the float32 dequantization of the scaled-integer logits (as the source does) and runs after the
fixed-point core, on every target; the outputs equal the reference interpreter's bit for bit and the
Brevitas module's to float32 rounding (fidelity is checked by the compile itself, which raises on a
real mismatch).  Found by a fresh-user trial: such models were refused ("Softmax on a scaled-integer
value ... is not supported")."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
qnn = pytest.importorskip("brevitas.nn")

import qdeploy  # noqa: E402
from qdeploy.runtime import CompiledModel  # noqa: E402


class _SoftmaxMLP(torch.nn.Module):
    def __init__(self, out_quant: bool):
        super().__init__()
        self.inp = qnn.QuantIdentity(bit_width=8, return_quant_tensor=True)
        self.fc1 = qnn.QuantLinear(16, 32, bias=True, weight_bit_width=4)
        self.r1 = qnn.QuantReLU(bit_width=4, return_quant_tensor=True)
        self.fc2 = qnn.QuantLinear(32, 5, bias=True, weight_bit_width=4)
        self.oq = qnn.QuantIdentity(bit_width=8) if out_quant else None
        self.sm = torch.nn.Softmax(dim=-1)

    def forward(self, x):
        y = self.fc2(self.r1(self.fc1(self.inp(x))))
        return self.sm(self.oq(y) if self.oq is not None else y)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("out_quant", [False, True], ids=["float_bias_logits", "quantized_logits"])
def test_softmax_on_scaled_logits_compiles_exact(tmp_path, out_quant):
    torch.manual_seed(3)
    m = _SoftmaxMLP(out_quant).eval()
    x = np.random.default_rng(0).normal(0, 1.5, (40, 16)).astype(np.float32)
    with torch.no_grad():
        want_src = m(torch.from_numpy(x)).numpy()
    outs = {}
    for target in ("reference", "tvm-llvm", "hls4ml"):
        res = qdeploy.compile(m, target, tmp_path / target, golden=x, example_input=torch.from_numpy(x[:1]))
        cm = CompiledModel.load(tmp_path / target)
        assert "Softmax" in [n.op for n in cm.graph.nodes] or "Softmax" in str(cm.manifest)
        outs[target] = cm.predict(x)
        assert res is not None
    assert np.array_equal(outs["tvm-llvm"], outs["reference"])
    assert np.array_equal(outs["hls4ml"], outs["reference"])
    assert outs["reference"].dtype == np.float32 and np.allclose(outs["reference"].sum(-1), 1, atol=1e-6)
    assert np.allclose(outs["reference"], want_src, rtol=0, atol=1e-6)
    assert (outs["reference"].argmax(-1) == want_src.argmax(-1)).all()
