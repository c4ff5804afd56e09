"""NumPy / torch arrays <-> TVM tensors for the ``tvm-llvm`` runtime: zero-copy DLPack where the
data is 64-byte aligned (TVM docs: ``tvm.runtime.from_dlpack``), and the checked input arrays
a library takes (:func:`feed_array`)."""
from __future__ import annotations

import numpy as np

from ...compiler.errors import FeedError
from ...compiler.ir.types import FixedType

__all__ = ["aligned", "to_tvm", "fast_imports", "from_tvm", "feed_array"]


def aligned(a: np.ndarray) -> np.ndarray:
    """``a`` (C-contiguous) or a copy of it whose data is 64-byte aligned (DLPack import needs it)."""
    if a.ctypes.data % 64 == 0:
        return a
    buf = np.empty(a.nbytes + 64, dtype=np.uint8)
    off = (-buf.ctypes.data) % 64
    b = buf[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
    b[...] = a
    return b


def to_tvm(a):
    """A TVM tensor for a C-contiguous numpy array or torch CPU tensor ``a`` (right dtype):
    zero-copy through DLPack when the data is 64-byte aligned, one aligned copy otherwise.
    (torch is used when importable: its allocations are 64-byte aligned and its pointer check
    is cheaper than numpy's ``ctypes``.)"""
    torch, from_dlpack = fast_imports()
    if torch is not None:
        t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
        if not t.is_contiguous():
            t = t.contiguous()
        if t.numel() == 0:
            import tvm

            return tvm.runtime.tensor(t.numpy())
        if t.data_ptr() % 64:
            t = t.clone()
        return from_dlpack(t)
    import tvm

    if a.size == 0 or not a.flags.c_contiguous:
        return tvm.runtime.tensor(np.ascontiguousarray(a))
    return from_dlpack(aligned(a))


_FAST: list = []


def fast_imports():
    """(torch or None, tvm.runtime.from_dlpack), imported once."""
    if not _FAST:
        import tvm

        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a project dependency
            torch = None
        _FAST.extend([torch, tvm.runtime.from_dlpack])
    return _FAST[0], _FAST[1]


def from_tvm(t) -> np.ndarray:
    """A numpy view of a TVM CPU tensor (zero-copy DLPack; a copy when that is refused)."""
    try:
        return np.from_dlpack(t)
    except Exception:  # pragma: no cover
        return np.asarray(t.numpy())


def feed_array(feeds: dict, name: str, v, dt, quantized: bool) -> np.ndarray:
    """Input ``name`` (IR value ``v``) of ``feeds`` as the C-contiguous ``dt`` array a library takes.

    Raises:
        KeyError: the input is missing.
        FeedError (a ValueError): a shape other than ``(N, *v.shape)``; NaN in an input the library quantizes
            (compiled code cannot raise; the reference does); integer codes outside a fixed-point
            input's type (the library narrows by that type, :mod:`.intplan`, so it would compute
            them differently from the reference).
    """
    if name not in feeds:
        raise KeyError(f"missing input {name!r}")
    a = np.ascontiguousarray(np.asarray(feeds[name]), dtype=dt)
    if a.shape[1:] != tuple(v.shape):
        raise FeedError(f"input {name!r} has shape {a.shape}, expected (N, {', '.join(map(str, v.shape))})", name)
    if quantized and np.isnan(a).any():
        bad = np.flatnonzero(np.isnan(a.reshape(len(a), -1)).any(axis=1))[:10].tolist()
        raise FeedError(f"input {name!r} contains NaN (sample(s) {bad}): fixed-point types have no NaN", name)
    if isinstance(v.dtype, FixedType) and a.size:
        lo, hi = v.dtype.min_code, v.dtype.max_code
        if a.min() < lo or a.max() > hi:
            raise FeedError(f"input {name!r} has codes outside its type {v.dtype} [{lo}, {hi}]: [{a.min()}, {a.max()}]", name)
    return a
