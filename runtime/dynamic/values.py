"""Host values of a dynamic program and the per-block call helpers shared by its two paths.

A value between blocks is either a :class:`DevVal` (a batch on the device side, IR layout,
possibly a zero-copy view of a backend tensor) or a :class:`HostVal` (one torch value per
sample, as the batch-1 source computes it).  Host ops are fx nodes evaluated with
:func:`node_call` closures built once per node (:func:`binder` maps their arguments).
"""
from __future__ import annotations

import numpy as np

from ...compiler.ir.layout import NCHW, from_ir, to_ir

__all__ = ["DevVal", "HostVal", "as_device", "dev_input1", "single_torch", "host1_to_device", "to_numpy",
           "BlockCallPlan", "fx_nodes", "binder", "node_call"]


class DevVal:
    """A batch of device values: ``arr`` (n, *IR shape), IR layout ``kind``; ``tv``: the TVM
    tensor ``arr`` views (zero-copy), passed as is to the next compiled block, or None."""
    __slots__ = ("_arr", "kind", "tv")

    def __init__(self, arr, kind, tv=None):
        self._arr, self.kind, self.tv = arr, kind, tv

    @property
    def arr(self):
        a = self._arr
        if a is None:  # made on first use: a zero-copy view of the backend tensor
            a = self._arr = np.from_dlpack(self.tv)
        return a

    def sample(self, i):
        import torch
        a = self.arr
        return torch.from_numpy(from_ir(a if i == 0 and a.shape[0] == 1 else a[i:i + 1], self.kind))

    def take(self, sel):
        return DevVal(self.arr[sel], self.kind)

    def sig(self):
        return ("D", self.kind, self.arr.shape[1:], self.arr.dtype.str)


class HostVal:
    """A batch of host values: one torch value per sample (as the batch-1 source computes it)."""
    __slots__ = ("items",)

    def __init__(self, items):
        self.items = items

    def sample(self, i):
        return self.items[i]

    def take(self, sel):
        return HostVal([self.items[j] for j in np.flatnonzero(sel)] if sel.dtype == bool else [self.items[j] for j in sel])

    def sig(self):
        return ("H",)


def as_device(v, kind):
    """A batch value as a device input array (n, *IR shape): a :class:`DevVal`'s array, or the
    host samples concatenated (float32) and put in IR layout for ``kind``."""
    if isinstance(v, DevVal):
        return v.arr
    import torch
    a = torch.cat([torch.as_tensor(t) for t in v.items]).numpy().astype(np.float32, copy=False)
    return to_ir(a) if kind == NCHW else a



def dev_input1(v, kind):
    """Batch-1 value -> device input for a generated step (torch tensor or numpy array)."""
    if isinstance(v, DevVal):
        if v.tv is not None:
            return v.tv
        return np.ascontiguousarray(v.arr, dtype=np.float32)
    return host1_to_device(v, kind)


def single_torch(x) -> bool:
    """A batch-1 float32 CPU torch tensor (the fast ``run`` path takes it without numpy)."""
    if type(x).__module__ == "numpy":
        return False
    import torch

    return (isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == 1 and x.dtype == torch.float32
            and not x.is_cuda and x.device.type == "cpu")


def host1_to_device(v, kind):
    """One-sample host value -> device input (torch float32 tensor in IR layout when possible,
    else a numpy array; the backend shares it zero-copy when aligned)."""
    import torch

    t = v.items[0] if len(v.items) == 1 else None
    if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and not t.requires_grad:
        if kind == NCHW and t.dim() == 4:
            return t.permute(0, 2, 3, 1).contiguous()
        if kind != NCHW and t.dim() == 2:
            return t.contiguous()
    return np.ascontiguousarray(as_device(v, kind), dtype=np.float32)


def to_numpy(v):
    """A batch value (:class:`DevVal` or :class:`HostVal`) -> torch-layout numpy array (n, ...)."""
    if isinstance(v, DevVal):
        return from_ir(v.arr, v.kind)
    import torch
    items = v.items
    if items and isinstance(items[0], torch.Tensor) and items[0].dim() >= 1 and items[0].shape[0] == 1:
        return torch.cat(items).numpy()
    return np.asarray([np.asarray(t) for t in items])


class BlockCallPlan:
    """Per-block call plan, built once per block: the backend's raw tensor entry (``tensors``) with
    its input variables (``in_vars``, ``[(var, kind)]`` in entry order) and output names, the host
    ops as ``[(fx node name, node_call closure)]``, their leaf arguments (``[(name, source, ref)]``,
    source ``env`` / ``dev`` / ``const``), the host values the block outputs (``wanted``) and the
    stage name."""
    __slots__ = ("tensors", "in_vars", "out_names", "host", "leaves", "wanted", "stage")

    def __init__(self):
        self.stage = None
        self.tensors, self.in_vars, self.out_names = None, [], []
        self.host, self.leaves, self.wanted = [], [], []


def fx_nodes(a):
    """The fx nodes inside a (nested) argument structure."""
    import torch

    found = []
    torch.fx.node.map_arg(a, lambda n: found.append(n) or n)
    return found


def binder(a):
    """``f(vals) -> a`` with every fx node in ``a`` replaced by ``vals[node.name]`` (built once
    per host node instead of mapping the arguments on every call)."""
    import torch

    if isinstance(a, torch.fx.Node):
        nm = a.name
        return lambda v: v[nm]
    if isinstance(a, (tuple, list)):
        if not fx_nodes(a):
            return lambda v: a
        fs = [binder(x) for x in a]
        t = type(a)
        if t is tuple and len(fs) == 1:
            f0 = fs[0]
            return lambda v: (f0(v),)
        if t is tuple and len(fs) == 2:
            f0, f1 = fs
            return lambda v: (f0(v), f1(v))
        if t is tuple:
            return lambda v: tuple([f(v) for f in fs])
        if t is list:
            return lambda v: [f(v) for f in fs]
        return lambda v: t(*(f(v) for f in fs))  # named tuples
    if isinstance(a, dict):
        if not fx_nodes(a):
            return lambda v: a
        fs = {k: binder(x) for k, x in a.items()}
        return lambda v: {k: f(v) for k, f in fs.items()}
    if isinstance(a, slice):
        if not fx_nodes((a.start, a.stop, a.step)):
            return lambda v: a
        f0, f1, f2 = binder(a.start), binder(a.stop), binder(a.step)
        return lambda v: slice(f0(v), f1(v), f2(v))
    return lambda v: a


def node_call(nd, call):
    """``f(vals)`` evaluating the fx node ``nd`` (``call(args, kwargs)``) on named values."""
    fa, fk = binder(nd.args), binder(nd.kwargs)
    if nd.op == "call_function" and not nd.kwargs:
        f = nd.target
        return lambda v: f(*fa(v))
    if nd.op == "call_method" and nd.args and not fx_nodes(nd.kwargs):
        name, f0, rest, kw = nd.target, binder(nd.args[0]), binder(tuple(nd.args[1:])), dict(nd.kwargs)
        return lambda v: getattr(f0(v), name)(*rest(v), **kw)
    return lambda v: call(fa(v), fk(v))
