"""The thin call path of a loaded TVM library: positional arrays in, runtime arrays out.

:class:`FastCall` is what :meth:`qdeploy.runtime.CompiledModel.predict` calls per request once
it has turned the user's arrays into IR-layout runtime arrays
(:class:`qdeploy.runtime.predictor.Predictor`).  Per call it does only:

* the VM call, through the static batch-1 entry ``main_b1`` when the library has one and the
  batch is 1 (no symbolic-shape dispatch in the VM), the static entry of a tuned library's batch
  (``main_b<B>``, :mod:`.tune`) when the batch is ``B``, else ``main``;
* inputs passed as TVM tensors that the caller filled in place (:meth:`FastCall.buffers`:
  64-byte aligned tensors allocated once per batch size, with writable NumPy views of the same
  memory), or numpy / torch arrays shared zero-copy through DLPack when aligned;
* outputs viewed zero-copy through DLPack (``np.from_dlpack``; the VM allocates fresh output
  tensors each call, so the views stay valid), copied only when an output shares memory with a
  reused input buffer;
* the host epilogue (trailing float ops that run in NumPy so the artifact stays bit-exact) as a
  precomputed list of kernels: :func:`.host_kernels.fast_kernel`'s (bit-identical to the
  reference's, with the per-node constants converted once) where it has one, else the same
  ``OpSpec.reference`` calls :func:`qdeploy.compiler.reference.execute` makes, without its
  per-call bookkeeping.

DLPack: https://dmlc.github.io/dlpack/latest/ ; TVM's CPU allocator aligns to 64 bytes
(``kAllocAlignment``), which ``tvm.runtime.from_dlpack`` requires of imported arrays.
"""
from __future__ import annotations

import operator
import threading
from typing import Callable, Sequence

import numpy as np

from ...compiler.ir.graph import Graph
from ...compiler.ir.ops import get as get_op
from ...compiler.ir.types import FixedType
from .host_kernels import fast_kernel

__all__ = ["FastCall", "epilogue_plan"]


def _array_item():
    """``item(array, i)``: element ``i`` of the tuple a Relax VM entry returns (a ``tvm_ffi``
    Array), by the FFI getter itself (``tvm_ffi`` implements ``Array.__getitem__`` in Python around
    it: index normalization and a length call, about 2 us per call); ``operator.getitem`` when that
    getter is not there."""
    try:
        from tvm_ffi import _ffi_api
        return _ffi_api.ArrayGetItem
    except (ImportError, AttributeError):  # pragma: no cover - another tvm_ffi layout
        return operator.getitem


def epilogue_plan(epilogue: Graph) -> Callable[[dict], dict]:
    """A function running ``epilogue`` on runtime arrays exactly like
    ``reference.execute(epilogue, env, codes=True)``: every node's ``OpSpec.reference`` kernel in
    topological order, with the node, input types and output type looked up once here.

    Args:
        epilogue: the host part of a split graph (:func:`qdeploy.passes.partition.split_epilogue`).
    Returns:
        ``f(env) -> {output name: array}``; ``env`` maps each epilogue input to its runtime array
        ``(N, *shape)`` (codes of any integer dtype for fixed types: cast to int64 here, as the
        reference's ``prepare_feeds(codes=True)`` does; float32 otherwise).
    """
    steps = []
    for n in epilogue.nodes:
        in_types = [epilogue.values[i].dtype for i in n.inputs]
        out_t = epilogue.values[n.output].dtype
        fast = fast_kernel(n, in_types, out_t)  # the same bits, less work per call (host_kernels.py)
        if fast is None:
            ref = get_op(n.op).reference
            fast = (lambda r, node, it, ot: lambda args: r(node, args, it, ot))(ref, n, in_types, out_t)
        steps.append((fast, list(n.inputs), n.output))
    fixed_in = [i for i in epilogue.inputs if isinstance(epilogue.values[i].dtype, FixedType)]
    float_in = [i for i in epilogue.inputs if i not in fixed_in]
    outs = list(epilogue.outputs)

    def run(env: dict) -> dict:
        env = dict(env)
        for i in fixed_in:
            if env[i].dtype != np.int64:
                env[i] = env[i].astype(np.int64)
        for i in float_in:
            if env[i].dtype != np.float32:
                env[i] = env[i].astype(np.float32)
        for kernel, ins, out in steps:
            env[out] = kernel([env[i] for i in ins])
        return {o: env[o] for o in outs}

    # a chain (one input, each node reading the one before, one output): the kernels in order,
    # for FastCall.one's single-array path
    chain = len(epilogue.inputs) == 1 and len(outs) == 1 and bool(steps) and outs[0] == steps[-1][2] and \
        all(ins == [epilogue.inputs[0] if k == 0 else steps[k - 1][2]] for k, (_, ins, _) in enumerate(steps))
    run.chain = [k for k, _, _ in steps] if chain else None
    run.chain_int64 = bool(fixed_in)
    return run


class FastCall:
    """Positional call of a loaded TVM library plus its host epilogue.

    Args:
        entry: the VM's ``main`` (symbolic batch).
        entry1: the VM's static batch-1 entry ``main_b1``, or None when the library has none.
        input_shapes: per-sample IR shape of each library input, in order.
        input_dtypes: NumPy dtype the library takes for each input (codes or float32).
        core_outputs: names of the library's outputs, in order.
        outputs: names of the model's outputs (the library's, or the epilogue's when there is
            one), in order.
        epilogue: the host epilogue graph or None.
        to_tensor: converter of a C-contiguous numpy array / torch tensor to a TVM tensor
            (zero-copy when 64-byte aligned).
        from_tensor: converter of a TVM tensor to a NumPy array (a zero-copy DLPack view).
        tensor_type: the TVM tensor class (inputs of that type are passed as they are).
        empty: ``empty(shape, dtype) -> TVM tensor`` allocating (aligned) CPU memory.
        static: ``{batch size: VM entry}`` of static entries other than ``main_b1`` (the tuned
            batch's ``main_b<B>``), called when a call's batch has one.
    """

    def __init__(self, entry, entry1, input_shapes: Sequence[tuple], input_dtypes: Sequence,
                 core_outputs: Sequence[str], outputs: Sequence[str], epilogue: Graph | None,
                 to_tensor, from_tensor, tensor_type, empty, static: dict | None = None):
        self.entry = entry
        self.entry1 = entry1
        self.input_shapes = [tuple(s) for s in input_shapes]
        self.input_dtypes = [np.dtype(d) for d in input_dtypes]
        self.core_outputs = list(core_outputs)
        self.outputs = list(outputs)
        self._epilogue = epilogue_plan(epilogue) if epilogue is not None else None
        self.to_tensor = to_tensor
        self._from_tensor = from_tensor
        self._tensor_type = tensor_type
        self._empty = empty
        self.static = dict(static or {})
        self._bufs: dict[int, tuple] = {}
        self._bufs_lock = threading.Lock()
        self._item = _array_item()

    def buffers(self, n: int):
        """``(lock, tensors, views)``: one reusable, 64-byte aligned input tensor per library
        input for batch size ``n`` (allocated on first use, the last four sizes kept) and a
        writable NumPy view of each.  The caller fills the views and calls :meth:`__call__` with
        the tensors while it holds ``lock`` (acquire it without blocking and allocate fresh arrays
        when another thread holds it)."""
        b = self._bufs.get(n)
        if b is None:
            tensors = [self._empty((n, *s), str(d)) for s, d in zip(self.input_shapes, self.input_dtypes)]
            views = [np.from_dlpack(t) for t in tensors]
            if not all(v.flags.writeable for v in views):  # pragma: no cover - numpy < 2.1
                views = None
            b = (threading.Lock(), tensors, views)
            with self._bufs_lock:
                if len(self._bufs) >= 4:
                    self._bufs.pop(next(iter(self._bufs)))
                self._bufs[n] = b
        return b

    def entry_for(self, n: int):
        """The VM entry a batch of ``n`` runs: a static entry of that size if there is one
        (``main_b1`` for 1, the tuned ``main_b<B>``), else the symbolic ``main``."""
        if n == 1 and self.entry1 is not None:
            return self.entry1
        return self.static.get(n, self.entry) if self.static else self.entry

    def one(self) -> Callable | None:
        """``f(entry, tensors, reused) -> array``: the call of a library with one output whose
        epilogue (if any) is a chain of single-input ops -- :meth:`__call__` with its one result,
        in fewer steps, through the VM ``entry`` the caller chose (:meth:`entry_for`).  None for
        other libraries."""
        if len(self.core_outputs) != 1 or len(self.outputs) != 1:
            return None
        ep = self._epilogue
        chain = [] if ep is None else ep.chain
        if chain is None:
            return None
        to_int64 = ep is not None and ep.chain_int64
        from_t, may_share, i64, item = self._from_tensor, np.may_share_memory, np.int64, self._item

        def run(entry, tensors, reused):
            g = from_t(item(entry(*tensors), 0))
            for r in reused:
                if may_share(g, r):
                    g = g.copy()
                    break
            if to_int64 and g.dtype != i64:
                g = g.astype(i64)
            for k in chain:
                g = k([g])
            return g
        return run

    def __call__(self, arrays: list, batch1: bool = False, reused: Sequence[np.ndarray] = (),
                 batch: int | None = None) -> list:
        """Run the library on positional inputs and return the model's outputs.

        Args:
            arrays: one per library input, ``(N, *input_shapes[i])`` of ``input_dtypes[i]``
                (not checked): TVM tensors, or C-contiguous numpy arrays / torch CPU tensors.
            batch1: ``N == 1`` and the static batch-1 entry may be used.
            batch: ``N``, when the caller knows it: a static entry of that size is used
                (:meth:`entry_for`); None: ``batch1`` decides between ``main_b1`` and ``main``.
            reused: the NumPy views of reused input buffers among ``arrays``: an output that
                shares memory with one of them is copied.
        Returns:
            the runtime arrays of :attr:`outputs` in order (int64/integer codes or float32,
            ``(N, *shape)``, IR layout): zero-copy views of the library's fresh outputs, or the
            epilogue's results.
        """
        tt = self._tensor_type
        args = [a if isinstance(a, tt) else self.to_tensor(a) for a in arrays]
        if batch is not None:
            fn = self.entry_for(batch)
        else:
            fn = self.entry1 if batch1 and self.entry1 is not None else self.entry
        res = fn(*args)
        item = self._item
        got = [self._from_tensor(item(res, i)) for i in range(len(self.core_outputs))]
        if reused:
            got = [g.copy() if any(np.may_share_memory(g, r) for r in reused) else g for g in got]
        if self._epilogue is None:
            return got
        env = self._epilogue(dict(zip(self.core_outputs, got)))
        core = dict(zip(self.core_outputs, got))
        return [env[o] if o in env else core[o] for o in self.outputs]
