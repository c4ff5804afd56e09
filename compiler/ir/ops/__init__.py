"""The IR op catalogue: one :class:`OpSpec` per op, declared once in one module per op family.

Every op has an exact type rule ``(node, input values) -> (output shape, output dtype)``.  For
fixed-point inputs the rule returns the narrowest type that holds every possible result
*exactly*: the result of a fixed-point op is never rounded or overflowed; only ``Quantize`` (and
``Sign``) change precision.  Precision inference (:mod:`qdeploy.passes.precision`) is running
these rules.  Each spec also carries the op's reference kernel on integer codes (the golden model,
:mod:`qdeploy.compiler.reference`) and its compute cost.

Modules: :mod:`.spec` (OpSpec, the registry, :func:`infer`, shared shape/type helpers),
:mod:`.kernels` (NumPy helpers of the reference kernels), and one module per op family
(``quantize``, ``linear``, ``activation``, ``elementwise``, ``shape``, ``pool``).  Every other
module of this package is imported here, in name order, so an op module registers its ops just
by existing (see ``docs/adding_an_op.md``).

Shapes omit the batch dimension and are channels-last (see :mod:`..graph`).
"""
from __future__ import annotations

import importlib
import pkgutil

from .pool import avg_shift
from .spec import (REGISTRY, OpSpec, all_fixed, all_ops, broadcast_shape, check_arity, code_range, conv_out_shape,
                   default_macs, get, infer, is_float, register)

_SUPPORT_MODULES = {"spec", "kernels"}
for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _m not in _SUPPORT_MODULES:
        importlib.import_module(f"{__name__}.{_m}")

#: Names of the built-in ops (every op module of this package), in registration order.
OPS = all_ops()

__all__ = ["OPS", "REGISTRY", "OpSpec", "all_fixed", "all_ops", "avg_shift", "broadcast_shape", "check_arity",
           "code_range", "conv_out_shape", "default_macs", "get", "infer", "is_float", "register"]
