"""The thin per-call path of :meth:`qdeploy.runtime.CompiledModel.predict`.

Everything that depends only on the artifact is worked out once, when the model is loaded: each
input's expected shape in the source and in the channels-last layout, the permutation to the IR
layout, its quantizer (fixed-point inputs) and the dtype the library takes; each output's
dequantization and inverse permutation.  A call then checks the shapes with tuple compares,
writes each input -- transposed, cast or quantized -- in one pass into a reusable, aligned buffer
the library reads in place (DLPack, no further copy), runs the library (its static batch-1
entry for a batch of one), and views the outputs zero-copy.

Behaviour is the general path's (:func:`qdeploy.runtime.compiled.user_feeds` ->
``run_codes`` -> :func:`~qdeploy.runtime.compiled.user_outputs`), bit for bit: the same quantizer
(:meth:`~qdeploy.compiler.ir.types.FixedType.quantize_real`), casts and dequantization
(:meth:`~qdeploy.compiler.ir.types.FixedType.to_real`).  Anything unusual -- a shape that does not
match, NaN, a nested list, a non-numeric dtype, inputs of different batch sizes -- is handed to
the general path, which raises the error in the user's layout as before; so does a backend
without a positional call (``fn.fast``).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..compiler.ir.graph import Graph
from ..compiler.ir.types import FixedType
from .layout import Layout, channels_last_mode

__all__ = ["Predictor", "BUFFER_LIMIT_BYTES"]

#: Inputs of a batch whose library arrays together exceed this many bytes are written into fresh
#: arrays each call instead of reusable buffers (so a one-off huge batch is not kept alive).
BUFFER_LIMIT_BYTES = 16 << 20


def _has_nan(a: np.ndarray) -> bool:
    """Whether ``a`` holds a NaN (integer and boolean arrays hold none)."""
    return a.dtype.kind not in "biu" and bool(np.isnan(a).any())


def _min_is_nan(a: np.ndarray) -> bool:
    """Whether float array ``a`` holds a NaN: ``np.minimum`` propagates NaN, so the minimum is NaN
    exactly then; one vectorized reduction, no temporary array."""
    s = np.minimum.reduce(a, None)
    return bool(s != s)


class _Input:
    """One model input's precomputed plan (see :class:`Predictor`)."""

    __slots__ = ("name", "rank", "want", "perm", "quantize", "nan_check")

    def __init__(self, name: str, ir_shape: tuple, lay: Layout, dtype, nan_check: bool):
        self.name = name
        self.rank = len(ir_shape) + 1
        self.want, self.perm = [], []
        for cl in (False, True):  # index 0: source layout, 1: channels-last (IR) layout
            perm = tuple(range(self.rank)) if cl else lay.perm
            user = [0] * self.rank
            for i, p in enumerate(perm):
                user[p] = ((-1,) + tuple(ir_shape))[i]
            self.want.append(tuple(user[1:]))
            self.perm.append(None if perm == tuple(range(self.rank)) else perm)
        # fixed-point inputs are quantized on the host exactly as prepare_feeds does
        self.quantize = dtype.quantize_real if isinstance(dtype, FixedType) else None
        self.nan_check = nan_check or self.quantize is not None


class Predictor:
    """``predict`` for one loaded artifact, with its per-artifact work done once.

    Args:
        graph: the artifact's IR graph (interface names, shapes and types).
        input_layouts / output_layouts: the declared :class:`~qdeploy.runtime.layout.Layout` of
            each input / output (the manifest's, never inferred).
        fn: the backend's loaded callable; its ``fast`` attribute (a positional call such as
            :class:`qdeploy.backends.tvm.fastcall.FastCall`, with ``input_dtypes``,
            ``buffers(n)`` and ``__call__(arrays, batch1, reused, batch=n)``) enables the thin path, and
            ``fn.fast_nan_check`` flags the float inputs that the library quantizes (NaN has no
            code there, so NaN is refused before the call, as the general path does).
        general: ``general(inputs, layout)``, the general path; called for everything the thin
            path does not handle, so that errors are raised exactly as before.
    """

    def __init__(self, graph: Graph, input_layouts: dict[str, Layout], output_layouts: dict[str, Layout],
                 fn, general: Callable):
        self._general = general
        self._layouts = input_layouts
        self._modes: dict = {}
        fast = getattr(fn, "fast", None)
        if fast is not None and (list(getattr(fn, "input_names", [])) != list(graph.inputs)
                                 or list(fast.outputs) != list(graph.outputs)):
            fast = None  # the library's interface is not the model's: keep to the general path
        self._fast = fast
        self.names = list(graph.inputs)
        nan = list(getattr(fn, "fast_nan_check", None) or [False] * len(self.names))
        self._ins = [_Input(n, tuple(graph.value(n).shape), input_layouts[n], graph.value(n).dtype, nan[i])
                     for i, n in enumerate(self.names)]
        self._dtypes = list(fast.input_dtypes) if fast is not None else []
        self._sample_bytes = sum(int(np.prod(graph.value(n).shape, dtype=np.int64)) * d.itemsize
                                 for n, d in zip(self.names, self._dtypes))
        self._outs = []
        for o in graph.outputs:
            t = graph.value(o).dtype
            lay = output_layouts[o]
            inv = tuple(lay.ir.index(a) for a in lay.source)
            self._outs.append((t.to_real if isinstance(t, FixedType) else None,
                               None if inv == tuple(range(len(inv))) else inv))
        self._one = self._make_one()

    def _make_one(self):
        """The path of a model with one input and one output in the source layout:
        ``one(a) -> output`` or None (``a`` is not a plain numeric array of one sample or a batch
        of samples: the caller takes the other paths).  The same steps as :meth:`__call__` --
        transpose, quantize or cast into the reusable buffer of the batch size, NaN refused through
        the general path, the static entry of the batch size if the library has one
        (:meth:`FastCall.entry_for`), the epilogue chain, the output conversion -- with everything
        looked up once here.  None when the library or model does not qualify."""
        fast = self._fast
        if fast is None or len(self._ins) != 1 or len(self._outs) != 1:
            return None
        run = fast.one()
        if run is None:
            return None
        spec = self._ins[0]
        cl = self._mode(None)
        want, perm, quantize = spec.want[cl], spec.perm[cl], spec.quantize
        rank = len(want) + 1
        nan_after = spec.nan_check and quantize is None
        to_real, inv = self._outs[0]
        back = None if cl else inv
        limit = BUFFER_LIMIT_BYTES // max(self._sample_bytes, 1)
        buffers, entry_for = fast.buffers, fast.entry_for
        isnan, min_reduce, f32 = np.isnan, np.minimum.reduce, np.float32

        def one(a):
            if type(a) is not np.ndarray or a.dtype.kind not in "biuf":
                return None
            shp = a.shape
            if len(shp) == rank:
                if shp[1:] != want:
                    return None
            elif shp == want:
                a = a[None]
            else:
                return None
            n = a.shape[0]
            if not n or n > limit:
                return None
            lock, tensors, bufs = buffers(n)  # FastCall keeps the last sizes' buffers
            if bufs is None:  # pragma: no cover - numpy < 2.1
                return None
            buf = bufs[0]
            if perm is not None:
                a = a.transpose(perm)
            if not lock.acquire(False):
                return None
            try:
                if quantize is not None:
                    if a.dtype.kind == "f" and isnan(a).any():
                        return None
                    a = quantize(a)
                buf[...] = a
                if nan_after:
                    s = min_reduce(buf, None)  # NaN exactly when buf holds one
                    if s != s:
                        return None
                r = run(entry_for(n), tensors, bufs)
            finally:
                lock.release()
            if to_real is not None:
                r = to_real(r)
            elif r.dtype != f32:
                r = r.astype(f32)
            return r if back is None else r.transpose(back)
        return one

    @property
    def thin(self) -> bool:
        """Whether the thin path is available (the backend offers a positional call)."""
        return self._fast is not None

    def raw_call(self, *inputs, layout=None) -> Callable[[], object]:
        """The bare library call that :meth:`__call__` makes for ``inputs``, for measuring the
        thin path's overhead: the inputs are converted once (as :meth:`__call__` converts them)
        into library tensors, and the returned function only calls the VM entry (``main_b1`` for a
        batch of one when the library has it, a tuned library's ``main_b<B>`` for its batch, else
        ``main``) on them -- no epilogue, no output
        conversion.

        Raises:
            QDeployError: as :meth:`__call__` (the inputs are run through it once, which also
                checks them); ValueError: when the backend has no positional call (``thin`` is
                False).
        """
        fast = self._fast
        if fast is None:
            raise ValueError("this backend has no bare library call (only the general predict path)")
        self(inputs, layout)  # the same checks and errors as predict
        x = inputs[0] if len(inputs) == 1 else inputs
        seq = tuple(x[n] for n in self.names) if isinstance(x, dict) else \
            (x if isinstance(x, (list, tuple)) else (x,))
        cl = self._mode(layout)
        tensors = []
        for a, spec, shape, dt in zip(seq, self._ins, fast.input_shapes, self._dtypes):
            a = np.asarray(a)
            a = a[None] if a.shape == spec.want[cl] else a
            a = a if spec.perm[cl] is None else a.transpose(spec.perm[cl])
            a = spec.quantize(a) if spec.quantize is not None else a
            buf = np.empty(a.shape, dt)
            np.copyto(buf, a, casting="unsafe")
            tensors.append(fast.to_tensor(buf))
        n = tensors[0].shape[0]
        entry = fast.entry_for(n) if hasattr(fast, "entry_for") else \
            (fast.entry1 if n == 1 and fast.entry1 is not None else fast.entry)
        return lambda: entry(*tensors)

    def _mode(self, layout) -> bool:
        """``channels_last_mode(layout, ...)``, memoized per ``layout`` value."""
        try:
            return self._modes[layout]
        except (KeyError, TypeError):
            cl = channels_last_mode(layout, self._layouts)  # raises for a bad value
            if isinstance(layout, (str, type(None))):
                self._modes[layout] = cl
            return cl

    def __call__(self, inputs: tuple, layout=None):
        """Run on ``predict``'s positional ``inputs`` (see ``CompiledModel.predict``).

        Returns:
            the output array, or a list in graph output order for several outputs.
        Raises:
            QDeployError: through the general path (bad layout, count, shape, NaN).
        """
        fast = self._fast
        if fast is None:
            return self._general(inputs, layout)
        one = self._one
        if one is not None and layout is None and len(inputs) == 1:  # one input, one output
            r = one(inputs[0])
            if r is not None:
                return r
        x = inputs[0] if len(inputs) == 1 else inputs
        if type(x) is np.ndarray:
            seq = (x,)
        elif isinstance(x, dict):
            seq = tuple(x.get(n) for n in self.names)
        elif isinstance(x, (list, tuple)):
            seq = x
        else:
            return self._general(inputs, layout)
        if len(seq) != len(self._ins):
            return self._general(inputs, layout)
        cl = self._mode(layout)
        views, n = [], None
        for a, spec in zip(seq, self._ins):
            if type(a) is not np.ndarray or a.dtype.kind not in "biuf":
                return self._general(inputs, layout)
            want = spec.want[cl]
            if a.shape == want:
                a = a[None]
            elif a.ndim != spec.rank or a.shape[1:] != want:
                return self._general(inputs, layout)
            if n is None:
                n = a.shape[0]
            elif a.shape[0] != n:
                return self._general(inputs, layout)
            perm = spec.perm[cl]
            views.append(a if perm is None else a.transpose(perm))
        if not n:  # an empty batch: the general path's behaviour, whatever it is
            return self._general(inputs, layout)
        lock = None
        if n * self._sample_bytes <= BUFFER_LIMIT_BYTES:
            lock, tensors, bufs = fast.buffers(n)
            if bufs is None or not lock.acquire(False):
                lock = None
        if lock is None:
            tensors = bufs = [np.empty((n, *s), d) for s, d in zip(fast.input_shapes, self._dtypes)]
        try:
            for a, spec, buf in zip(views, self._ins, bufs):
                if spec.quantize is not None:
                    if _has_nan(a):
                        return self._general(inputs, layout)
                    a = spec.quantize(a)
                buf[...] = a  # one pass: transpose, cast (as astype: unsafe casting), copy
                if spec.nan_check and spec.quantize is None and _min_is_nan(buf):
                    return self._general(inputs, layout)
            res = fast(tensors, n == 1, bufs if lock is not None else (), batch=n)
        finally:
            if lock is not None:
                lock.release()
        outs = []
        for r, (to_real, inv) in zip(res, self._outs):
            r = to_real(r) if to_real is not None else (r if r.dtype == np.float32 else r.astype(np.float32))
            outs.append(r if cl or inv is None else r.transpose(inv))
        return outs[0] if len(outs) == 1 else outs
