"""Brevitas / PyTorch importer: an ``nn.Module`` -> QONNX (Brevitas ``export_qonnx``) -> IR."""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable

from ..errors import ModelImportError, QDeployError
from ..ir.graph import Graph


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress prints and library warnings (they bury qdeploy's own
    output); errors still propagate."""
    import logging
    lg = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        lg.setLevel(old)


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
        ModelImportError: the export failed (Brevitas/onnxoptimizer missing, untraceable module).
        UnsupportedError: the exported graph uses something the IR cannot express.
    """
    try:
        import torch
        from brevitas.export import export_qonnx
    except Exception as e:  # pragma: no cover - dependency problem
        raise ModelImportError(f"Brevitas export needs torch and brevitas: {type(e).__name__}: {e}") from None
    from .qonnx import import_onnx

    gname = name or type(module).__name__
    # the IR is per sample (the batch axis is the runtime's): export one sample, so a batch in the
    # example input is not baked into the exported Reshape/Flatten shapes
    example_input = _one_sample(example_input)
    was_training = module.training
    module.eval()
    with tempfile.TemporaryDirectory(prefix="qdeploy_brevitas_") as tmp:
        path = os.path.join(tmp, f"{gname}.onnx")
        try:
            with torch.no_grad(), _quiet():
                export_qonnx(module, args=example_input, export_path=path)
        except QDeployError:
            raise
        except Exception as e:
            hint = _forward_hint(module, example_input)  # the module itself fails: that is the cause
            raise ModelImportError(hint or f"Brevitas export_qonnx of {gname} failed: {type(e).__name__}: {e}") \
                from None
        finally:
            module.train(was_training)
        g = import_onnx(path, name=gname)
    meta = dict(g.meta)
    meta.update(frontend="brevitas", source=f"brevitas:{type(module).__module__}.{type(module).__qualname__}")
    return g.with_(meta=meta)


def _forward_hint(module, example_input) -> str:
    """Why an export failed, when the module's own forward already fails on the example input:
    ``"the module's own forward fails on the example input of shape ...: ..."`` (with a note on the
    batch axis when the example has rank <= 1), else ``""``."""
    try:
        import torch
        with torch.no_grad(), _quiet():
            module(*example_input) if isinstance(example_input, (tuple, list)) else module(example_input)
    except Exception as e:  # noqa: BLE001 - any failure of the user's forward is the explanation
        ts = example_input if isinstance(example_input, (tuple, list)) else [example_input]
        shapes = [tuple(t.shape) for t in ts if hasattr(t, "shape")]
        first = " ".join(f"{type(e).__name__}: {e}".split())
        first = first if len(first) <= 200 else first[:200] + "..."
        batch = any(len(sh) <= 1 for sh in shapes)
        return (f"{type(module).__name__}: the module's own forward fails on the example input of shape "
                f"{', '.join(map(str, shapes)) or '?'} ({first}); "
                + ("the example input must be batch-first (one sample: shape (1, ...))" if batch else
                   "fix the module or give an example input it accepts (batch-first)"))
    return ""


def _one_sample(x):
    """The first sample of a batch-first example input (a tensor, or a tuple/list of tensors);
    anything else unchanged."""
    try:
        import torch
    except Exception:  # pragma: no cover
        return x
    if torch.is_tensor(x):
        return x[:1] if x.dim() > 1 and x.shape[0] > 1 else x
    if isinstance(x, (tuple, list)):
        return type(x)(_one_sample(t) for t in x)
    return x


def export_brevitas_qonnx(module, example_input, path, *, clean: bool = True,
                          postprocess: Callable | None = None) -> Path:
    """Export ``module`` with Brevitas' ``export_qonnx`` to ONE self-contained QONNX file.

    torch >= 2.9 exports through the dynamo ONNX exporter, which writes weights to a side file
    ``<path>.data`` and gives odd tensor names; this re-saves the model as one file, removes the
    side file, optionally runs qonnx ``cleanup_model`` (shape inference, constant folding,
    ``global_in``/``Quant_k`` names), applies ``postprocess(proto) -> proto`` if given, and runs
    the ONNX checker.

    Args:
        module: a Brevitas/torch ``nn.Module`` (put in eval mode).
        example_input: one batch-first tensor or array (the graph gets its batch size).
        path: output ``.onnx`` path (parent folders are created).
    Returns:
        the path.
    Raises:
        ModelImportError: the Brevitas export failed.
    """
    import numpy as np
    import onnx
    import torch
    from brevitas.export import export_qonnx

    x = torch.as_tensor(np.asarray(example_input, dtype=np.float32)) if not torch.is_tensor(example_input) \
        else example_input
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    try:
        with torch.no_grad(), _quiet():
            export_qonnx(module, args=x, export_path=str(path))
    except Exception as e:
        raise ModelImportError(f"Brevitas export_qonnx of {type(module).__name__} failed: {type(e).__name__}: {e}") from None
    proto = onnx.load(str(path))
    if clean:
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.util.cleanup import cleanup_model
        proto = cleanup_model(ModelWrapper(proto)).model
    if postprocess is not None:
        proto = postprocess(proto)
    side = path.with_name(path.name + ".data")
    if side.exists():
        side.unlink()
    onnx.save(proto, str(path), save_as_external_data=False)
    onnx.checker.check_model(str(path))
    return path
