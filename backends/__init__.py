"""Backends: one subpackage per target, registered by target name.

A backend turns an IR :class:`~qdeploy.compiler.ir.Graph` into an artifact directory and runs
it.  The contract every backend keeps (and the conformance tests check):

* ``emit(graph, config, out_dir) -> dict``: write the project/sources under ``out_dir`` (which
  exists and is empty); return a JSON-able dict of backend facts for ``manifest.json``
  (library versions, files, options actually used).
* ``build(out_dir, info) -> None``: compile what ``emit`` wrote (hls4ml: C simulation with g++;
  TVM: shared library).  ``info`` is the dict ``emit`` returned.
* ``load(out_dir, info, graph) -> Callable``: a callable ``f(feeds) -> outputs`` where ``feeds``
  maps each graph input name to a batch-first runtime array and ``outputs`` maps each graph
  output name to one -- *runtime arrays* are int64 codes for fixed-point values and float32
  for float values, exactly as :func:`qdeploy.compiler.reference.execute` returns them, so
  that exactness is a plain ``np.array_equal`` on codes.

Backends raise :class:`~qdeploy.compiler.errors.UnsupportedError` naming the node for anything
they cannot compile exactly.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol

TARGETS: dict[str, str] = {
    "reference": "qdeploy.backends.reference:ReferenceBackend",
    "hls4ml": "qdeploy.backends.hls4ml:Hls4mlBackend",
    "tvm-llvm": "qdeploy.backends.tvm:TvmBackend",
    "tvm-cuda": "qdeploy.backends.tvm.cuda:CudaBackend",
}


class Backend(Protocol):
    name: str

    def emit(self, graph, config: dict, out_dir) -> dict: ...

    def build(self, out_dir, info: dict) -> None: ...

    def load(self, out_dir, info: dict, graph) -> Callable[[dict], dict]: ...


def get_backend(target: str) -> Any:
    """The backend object registered for ``target``.

    Raises:
        ValueError: for an unknown target (the message lists the known ones).
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; known targets: {', '.join(TARGETS)}")
    mod, cls = TARGETS[target].split(":")
    return getattr(importlib.import_module(mod), cls)(target)
