"""Model importers: QONNX/ONNX and PyTorch/Brevitas -> IR, and IR -> QONNX export.

* :func:`import_onnx` -- ``.onnx`` file / ModelProto -> :class:`~qdeploy.compiler.ir.Graph`.
* :func:`import_brevitas` -- ``torch.nn.Module`` + example input -> Graph (via Brevitas ``export_qonnx``).
* :func:`export_qonnx` -- Graph -> QONNX ModelProto (runs in qonnx ``execute_onnx``).
* :func:`load_model` -- a ``.onnx`` path or a ``module:function`` spec -> Graph.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

from ..errors import ModelImportError, QDeployError
from .export import export_qonnx
from .qonnx import import_onnx


def import_brevitas(module, example_input, *, name=None):
    """See :func:`qdeploy.compiler.frontends.brevitas.import_brevitas` (imported lazily: torch is heavy)."""
    from .brevitas import import_brevitas as _imp
    return _imp(module, example_input, name=name)


def _load_callable(spec: str):
    """Import ``module:function`` (or ``path/file.py:function``).  Like ``python -m``, the current
    directory is importable, and a file's own folder is on the path while it loads, so a model
    file can import its siblings."""
    import sys

    mod_name, _, fn_name = spec.rpartition(":")
    if not mod_name or not fn_name:
        raise ModelImportError(f"model spec {spec!r} is neither an .onnx file nor 'module:function'")
    try:
        if mod_name.endswith(".py") or os.sep in mod_name:
            path = Path(mod_name)
            if not path.is_file():
                raise ModelImportError(f"model spec {spec!r}: file {mod_name!r} not found")
            folder = str(path.resolve().parent)
            added = folder not in sys.path
            if added:
                sys.path.insert(0, folder)
            try:
                s = importlib.util.spec_from_file_location(path.stem, path)
                mod = importlib.util.module_from_spec(s)
                s.loader.exec_module(mod)
            finally:
                if added:
                    sys.path.remove(folder)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            mod = importlib.import_module(mod_name)
    except QDeployError:
        raise
    except Exception as e:
        raise ModelImportError(f"model spec {spec!r}: cannot import {mod_name!r}: {type(e).__name__}: {e}") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ModelImportError(f"model spec {spec!r}: {mod_name!r} has no callable {fn_name!r}")
    return fn


def resolve_module_spec(spec: str):
    """``(torch module, example_input)`` of a ``module:function`` spec (see :func:`load_model`):
    the function is called once; callers that also need the module itself (the fidelity check
    runs it) resolve the spec with this and hand the module on, so it is never built twice.

    Raises:
        ModelImportError: bad spec, import failure, the call failing, or no example input.
    """
    s = os.fspath(spec)
    fn = _load_callable(s)
    try:
        res = fn()
    except Exception as e:
        raise ModelImportError(f"model spec {s!r}: calling {fn.__name__}() failed: {type(e).__name__}: {e}") from None
    if isinstance(res, tuple) and len(res) == 2:
        module, example = res
    else:
        module, example = res, getattr(res, "example_input", None)
    if example is None:
        raise ModelImportError(f"model spec {s!r}: {fn.__name__}() must return (module, example_input) or a module "
                               f"with an 'example_input' attribute")
    return module, example


def is_module_spec(path_or_spec) -> bool:
    """True when ``path_or_spec`` is a ``module:function`` spec string rather than a model file
    (what :func:`load_model` would resolve with :func:`resolve_module_spec`)."""
    if not isinstance(path_or_spec, (str, os.PathLike)):
        return False
    s = os.fspath(path_or_spec)
    return not (s.lower().endswith(".onnx") or Path(s).is_file())


def load_model(path_or_spec, *, name=None):
    """Load a model into the IR from a ``.onnx`` path or a ``module:function`` spec.

    ``module`` is an importable module name or a ``.py`` file path; ``function()`` returns either
    a tuple ``(torch_module, example_input)`` or a module carrying an ``example_input`` attribute
    (a batch-first tensor).  The module is exported with Brevitas (:func:`import_brevitas`).

    Raises:
        ModelImportError: file not found, unparsable model, bad spec, or a callable returning something
            else; plus everything :func:`import_onnx` / :func:`import_brevitas` raise.
    """
    if not isinstance(path_or_spec, (str, os.PathLike)):
        return import_onnx(path_or_spec, name=name)
    s = os.fspath(path_or_spec)
    if s.lower().endswith(".onnx") or Path(s).is_file():
        return import_onnx(s, name=name)
    module, example = resolve_module_spec(s)
    return import_brevitas(module, example, name=name)


__all__ = ["import_onnx", "import_brevitas", "export_qonnx", "load_model", "resolve_module_spec", "is_module_spec"]
