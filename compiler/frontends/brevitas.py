"""Brevitas / PyTorch importer: an ``nn.Module`` -> QONNX (Brevitas ``export_qonnx``) -> IR."""
from __future__ import annotations

import os
import tempfile

from ..errors import ImportError_, QDeployError
from ..ir.graph import Graph


def import_brevitas(module, example_input, *, name: str | None = None) -> Graph:
    """Export ``module`` with Brevitas' QONNX exporter and import the result.

    Args:
        module: a ``torch.nn.Module`` (Brevitas quantized layers or plain torch layers); it is put
            in ``eval()`` mode for the export.
        example_input: a batch-first ``torch.Tensor`` (e.g. ``[1, 16]`` or ``[1, C, H, W]``) used
            for tracing; only its per-sample shape matters.
        name: graph name (default: the module's class name).
    Returns:
        The IR :class:`Graph` (see :func:`qdeploy.compiler.frontends.qonnx.import_onnx` for the
        layout conventions); ``meta["frontend"] = "brevitas"``, ``meta["source"]`` names the class.
    Raises:
        ImportError_: the export failed (Brevitas/onnxoptimizer missing, untraceable module).
        UnsupportedError: the exported graph uses something the IR cannot express.
    """
    try:
        import torch
        from brevitas.export import export_qonnx
    except Exception as e:  # pragma: no cover - dependency problem
        raise ImportError_(f"Brevitas export needs torch and brevitas: {type(e).__name__}: {e}") from None
    from .qonnx import import_onnx

    gname = name or type(module).__name__
    was_training = module.training
    module.eval()
    with tempfile.TemporaryDirectory(prefix="qdeploy_brevitas_") as tmp:
        path = os.path.join(tmp, f"{gname}.onnx")
        try:
            with torch.no_grad():
                export_qonnx(module, args=example_input, export_path=path)
        except QDeployError:
            raise
        except Exception as e:
            raise ImportError_(f"Brevitas export_qonnx of {gname} failed: {type(e).__name__}: {e}") from None
        finally:
            module.train(was_training)
        g = import_onnx(path, name=gname)
    meta = dict(g.meta)
    meta.update(frontend="brevitas", source=f"brevitas:{type(module).__module__}.{type(module).__qualname__}")
    return g.with_(meta=meta)
