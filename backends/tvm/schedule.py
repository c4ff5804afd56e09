"""The default CPU loop schedule for the PrimFuncs of a legalized + fused Relax module.

TVM 0.27's default CPU pipeline lowers every operator to its naive loop nest (``conv2d_nhwc``
with the reduction innermost and the weight read with a stride, no vectorization, one thread);
dlight's CPU rules cover only GEMV and row reductions.  :func:`schedule_cpu` applies one fixed
rule per block, no search:

* elementwise intermediates are inlined into their consumer (``compute_inline``), so a fused
  ``conv -> scale -> add -> relu`` keeps one epilogue block -- unless the consumer's expression
  would exceed ``MAX_INLINED_CHARS`` (a value read k times is copied k times: chains of selects
  grow exponentially);
* a reduction block (convolution, matmul, pooling, threshold compare-and-count) whose innermost
  *spatial* loop is the output's contiguous axis (NHWC channels, the matmul's output features)
  gets its reduction loops moved outside that axis, which is vectorized; the next spatial loop
  is split by up to ``tile`` and unrolled (a register-tile of output pixels / rows); the init is
  split off (``decompose_reduction``); the elementwise epilogue that reads the accumulator is
  moved into the same outer loop (``reverse_compute_at``), so it runs on the tile still in cache;
* every other block gets its static trailing loops fused and vectorized in ``lanes`` chunks
  (or its innermost loop vectorized when that is all that fits);
* with ``parallel``, the leading spatial loops of every loop nest (batch, rows, ...) are fused
  and run on TVM's runtime thread pool (``T.parallel``): ``TVM_NUM_THREADS`` (else the number
  of cores) sets the thread count at run time, and with one thread the pool runs the loop
  inline.  A nest whose per-iteration work is tiny is parallelized over the batch only when
  the call has at least ``min_parallel_work`` element operations, through a run-time branch
  (a parallel copy and a serial copy of the loop nest), so batch-1 calls pay no thread wake-up.

The rule only reorders *spatial* loops against reduction loops, splits/fuses spatial loops,
vectorizes and parallelizes spatial loops: the order in which each output element's reduction
is accumulated is unchanged, so integer (int64 code) results are bit-identical and float
results differ from the unscheduled build only by what LLVM does to single operations (both
builds may contract multiply-adds).  Full reductions (no spatial axis, e.g. the global
``max |x|`` of a quantizer) stay serial.  Blocks the rule cannot handle (symbolic extents,
non-trivial bindings) are left as they were; set ``QDEPLOY_SCHEDULE_DEBUG=1`` to print why.
Reshape-pattern functions are left alone so that Relax's ``RewriteDataflowReshape`` turns them
into zero-copy views.

Built on TVM's ``s_tir.Schedule`` primitives (``compute_inline``, ``reverse_compute_at``,
``split``, ``fuse``, ``reorder``, ``unroll``, ``vectorize``, ``parallel``,
``decompose_reduction``; TVM docs, "tvm.s_tir.Schedule").  ``lanes`` = 16 fits AVX-512; on
narrower vector units LLVM splits the vectors.
"""
from __future__ import annotations

__all__ = ["schedule_cpu", "SCHEDULES", "DEFAULT_SCHEDULE", "MIN_PARALLEL_WORK"]

#: Accepted values of the ``tvm.schedule`` config option.
SCHEDULES = ("none", "auto")
#: The schedule used when the config names none.
DEFAULT_SCHEDULE = "auto"
#: Default ``min_parallel_work``: element operations a call must have before its loop nest
#: wakes the thread pool (a wake-up costs 1-15 us on a loaded 2-core machine, measured).
MIN_PARALLEL_WORK = 1 << 14
#: An elementwise value is inlined into its consumer only while the consumer's body stays
#: below this many characters of TIR text (inlining copies the value into every read).
MAX_INLINED_CHARS = 6000


def _int(e):
    from tvm import tirx
    return int(e) if isinstance(e, (int, tirx.IntImm)) else None


def _vectorize(sch, loop, lanes: int, max_len: int = 64):
    """Vectorize ``loop``: whole when it has at most ``max_len`` iterations and no divisor
    chunk fits, else split by ``lanes`` (or the largest divisor of its extent between 4 and
    ``lanes``) with the inner loop vectorized.  Returns the serial outer loop of a split, or
    None."""
    ext = _int(sch.get(loop).extent)
    if ext is None or ext <= 1:
        return None
    if ext <= lanes:
        sch.vectorize(loop)
        return None
    d = max(k for k in range(1, lanes + 1) if ext % k == 0)
    if d >= 4:
        outer, inner = sch.split(loop, [None, d])
        sch.vectorize(inner)
        return outer
    if ext <= max_len:
        sch.vectorize(loop)
    return None


def _kinds(sch, block):
    """[(loop, kind 'S'/'R')] for a block whose loops bind its iter vars one to one, else None."""
    from tvm import tirx
    blk = sch.get(block)
    loops = sch.get_loops(block)
    if len(loops) != len(blk.iter_vars):
        return None
    binds = _bindings(sch, block)
    if binds is None:
        return None
    out = []
    for lp, iv, val in zip(loops, blk.iter_vars, binds):
        if not (isinstance(val, tirx.Var) and val.same_as(sch.get(lp).loop_var)):
            return None
        if iv.iter_type == tirx.IterVar.DataPar:
            out.append((lp, "S"))
        elif iv.iter_type == tirx.IterVar.CommReduce:
            out.append((lp, "R"))
        else:
            return None
    return out


def _bindings(sch, block):
    from tvm import tirx
    from tvm.s_tir import SBlockRealize
    loops = sch.get_loops(block)
    if not loops:
        return None
    body = sch.get(loops[-1]).body
    if isinstance(body, tirx.SeqStmt):
        return None
    if isinstance(body, SBlockRealize):
        return list(body.iter_values)
    return None


def _prod(sch, loops):
    """Product of the static extents of ``loops``, treating a symbolic extent as 1 (the batch)."""
    p = 1
    for lp in loops:
        e = _int(sch.get(lp).extent)
        p *= 1 if e is None else e
    return p


def _schedule_reduction(sch, block, kinds, lanes: int, tile: int, parallel: bool, min_work: int, pars: list):
    """Reorder/tile/vectorize a reduction block, move its elementwise consumers into its outer
    spatial loop, parallelize that loop and split off the init.  Returns ``(schedule, names of
    the blocks scheduled here)``, or None when the block does not fit the rule (``sch`` may
    then be half-transformed: pass a copy)."""
    from tvm import tirx
    S = [lp for lp, k in kinds if k == "S"]
    R = [lp for lp, k in kinds if k == "R"]
    if not S or not R:
        return None
    last = S[-1]
    ext = _int(sch.get(last).extent)
    if ext is None or ext < 2:
        return None
    # the innermost spatial loop must index the written buffer's last (contiguous) axis
    blk = sch.get(block)
    idx = blk.writes[0].region[-1].min
    iv = blk.iter_vars[[i for i, (lp, _) in enumerate(kinds) if lp is last][0]].var
    if not (isinstance(idx, tirx.Var) and idx.same_as(iv)):
        return None
    name = blk.name_hint
    work = _prod(sch, [last, *R])
    order = list(S[:-1])
    inner = []
    if len(S) >= 2 and tile > 1:
        e2 = _int(sch.get(S[-2]).extent)
        if e2 is not None and e2 > 1:
            f = max(d for d in range(1, min(tile, e2) + 1) if e2 % d == 0)
            if f > 1:
                o, i = sch.split(S[-2], [None, f])
                order = list(S[:-2]) + [o]
                inner = [i]
                work *= f
    sch.reorder(*order, *R, *inner, last)
    for i in inner:
        sch.unroll(i)
    try:  # before decompose_reduction: vectorize needs the block to still be a reduction
        if not _has_bool(sch, block):
            _vectorize(sch, last, lanes)
    except Exception as e:  # noqa: BLE001
        _debug(e)
    names = {name}
    if order:
        outer = sch.fuse(*order) if len(order) > 1 else order[0]
        # the elementwise epilogue reading the accumulator: into the same outer loop
        for c in sch.get_consumers(block):
            if _is_reduction(sch, c):
                continue
            cname = sch.get(c).name_hint
            try:
                trial = sch.copy()
                trial.reverse_compute_at(c, outer)
                cl = trial.get_loops(trial.get_sblock(cname))
                if len(cl) > 1 and not _has_bool(trial, trial.get_sblock(cname)):
                    _vectorize(trial, cl[-1], lanes)
                sch = trial
                names.add(cname)
            except Exception as e:  # noqa: BLE001 - keep the epilogue separate
                _debug(e)
        if parallel:
            _parallel(sch, [outer], work, min_work, pars)
    sch.decompose_reduction(block, R[0])
    return sch, names


def _parallel(sch, loops, work: int, min_work: int, pars: list):
    """Fuse the leading loops ``loops`` (outermost first) and mark the fused loop parallel when
    one call can have enough work; appends ``(extent, work per iteration)`` of a parallel loop
    with a symbolic extent to ``pars``.  Returns the fused loop (or the single loop), or None."""
    if not loops:
        return None
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    extent = sch.get(fused).extent
    ext = _int(extent)
    if ext is not None and (ext < 2 or ext * work < min_work):
        return fused  # static and too small to pay for a thread wake-up
    sch.parallel(fused)
    if ext is None:
        pars.append((extent, work))
    return fused


def _schedule_func(func, lanes: int, tile: int, parallel: bool, min_work: int):
    """(scheduled PrimFunc, [(symbolic extent, work per iteration)] of its parallel loops)."""
    from tvm import s_tir

    pars: list = []

    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root") if _has_root(func) else None
    if root is None:
        return func, pars
    # 1. inline elementwise intermediates (not the ones feeding a reduction: padding stays a
    #    separate, vectorized loop instead of a branch inside the reduction)
    changed = True
    while changed:
        changed = False
        for b in sch.get_child_blocks(root):
            kinds = _kinds(sch, b)
            if kinds is None or any(k == "R" for _, k in kinds):
                continue
            cons = sch.get_consumers(b)
            if not cons or any(_is_reduction(sch, c) for c in cons):
                continue
            try:
                trial = sch.copy()
                trial.compute_inline(b)
            except Exception:  # noqa: BLE001 - not inlinable: keep the block
                continue
            # a value read several times is copied into each read: a chain of such values
            # (e.g. FloatQuant's 64 selects) grows exponentially -- keep it materialized
            if any(len(str(trial.get(c).body)) > MAX_INLINED_CHARS for c in cons):
                continue
            sch = trial
            changed = True
            break
    done: set[str] = set()
    # 2. reductions (and the epilogue reading each accumulator)
    for b in sch.get_child_blocks(root):
        kinds = _kinds(sch, b)
        if kinds is None or not any(k == "R" for _, k in kinds):
            continue
        n_par = len(pars)
        try:
            trial = sch.copy()
            res = _schedule_reduction(trial, b, kinds, lanes, tile, parallel, min_work, pars)
            if res is not None:
                sch, names = res
                done |= names
            else:
                del pars[n_par:]
        except Exception as e:  # noqa: BLE001 - leave the block unscheduled
            del pars[n_par:]
            _debug(e)
    # 3. everything else: static trailing loops fused and vectorized, leading loops parallel
    for b in sch.get_child_blocks(root):
        name = sch.get(b).name_hint
        if name in done:
            continue
        kinds = _kinds(sch, b)
        if kinds is None or any(k == "R" for _, k in kinds):
            continue
        n_par = len(pars)
        try:
            trial = sch.copy()
            loops = [lp for lp, _ in kinds]
            k = len(loops)
            while k > 0 and _int(trial.get(loops[k - 1]).extent) is not None:
                k -= 1
            static = loops[k:]
            lead = loops[:k]
            work = _prod(trial, static)
            inner = trial.fuse(*static) if len(static) > 1 else (static[0] if static else None)
            if inner is not None and _has_bool(trial, b):
                lead, work = [*lead, inner], 1
            elif inner is not None:
                outer = _vectorize(trial, inner, lanes)
                if outer is not None:
                    lead = [*lead, outer]
                    work = lanes
                elif _int(trial.get(inner).extent) is not None and _int(trial.get(inner).extent) > 64:
                    lead = [*lead, inner]
                    work = 1
            if parallel and lead:
                _parallel(trial, lead, work, min_work, pars)
            sch = trial
        except Exception as e:  # noqa: BLE001
            del pars[n_par:]
            _debug(e)
    return sch.mod["main"], pars


def _guard(par, ser, pars, min_work: int):
    """One PrimFunc running ``par`` (parallel loops) when the call's work
    ``sum(extent * work)`` over ``pars`` reaches ``min_work`` and ``ser`` (the same schedule
    without ``T.parallel``) otherwise: a run-time branch on the batch size, so small calls pay
    no thread-pool wake-up.  Loop variables the two copies share are renamed by TVM's
    ``ConvertSSA``.  Returns None when the two copies do not share their root allocations."""
    import tvm
    from tvm import tirx
    from tvm.s_tir import SBlock, SBlockRealize

    rp, rs = par.body, ser.body
    bp, bs = rp.block, rs.block
    if len(bp.alloc_buffers) != len(bs.alloc_buffers) or \
            not all(a.same_as(b) for a, b in zip(bp.alloc_buffers, bs.alloc_buffers)) or \
            not all(a.same_as(b) for a, b in zip(par.params, ser.params)):
        return None
    total = None
    for ext, work in pars:
        term = ext * int(work)
        total = term if total is None else total + term
    cond = total >= int(min_work)
    body = tirx.IfThenElse(cond, bp.body, bs.body)
    blk = SBlock(bp.iter_vars, bp.reads, bp.writes, bp.name_hint, body, bp.init, bp.alloc_buffers,
                 bp.match_buffers, bp.annotations)
    func = par.with_body(SBlockRealize(rp.iter_values, rp.predicate, blk))
    mod = tirx.transform.ConvertSSA()(tvm.IRModule({"main": func}))
    return mod["main"]


def _debug(e) -> None:
    import os
    if os.environ.get("QDEPLOY_SCHEDULE_DEBUG"):
        print(f"schedule_cpu: skipped: {type(e).__name__}: {str(e).strip()[-700:]}")


def _has_root(func) -> bool:
    from tvm.s_tir import SBlockRealize
    body = func.body
    return isinstance(body, SBlockRealize) and body.block.name_hint == "root"


def _has_bool(sch, block) -> bool:
    """True when the block reads or writes a bool tensor (not a 0-d flag): TVM 0.27's LLVM
    codegen emits invalid IR for vectorized bool loads (``and <8 x i8>, <8 x i1>``), so such
    blocks stay scalar."""
    blk = sch.get(block)
    return any(str(getattr(r.source, "dtype", "")) == "bool" and len(r.region) > 0
               for r in list(blk.reads) + list(blk.writes))


def _is_reduction(sch, block) -> bool:
    from tvm import tirx
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def schedule_cpu(mod, lanes: int = 16, tile: int = 4, parallel: bool = True,
                 min_parallel_work: int = MIN_PARALLEL_WORK):
    """Apply the fixed CPU schedule to every unscheduled PrimFunc of ``mod``.

    Args:
        mod: a Relax module after ``LegalizeOps``/``FuseOps``/``FuseTIR`` (e.g.
            ``relax.get_pipeline("zero")``); Relax functions are left alone.
        lanes: vector lanes (elements) per vectorized loop chunk (16 fits AVX-512 float32).
        tile: unroll factor of the second-innermost spatial loop of reductions.
        parallel: run the leading spatial loops on TVM's thread pool (``TVM_NUM_THREADS``).
        min_parallel_work: a loop nest with static extents whose total work (iterations times
            the reduction length, in element operations) is below this stays serial.
    Returns:
        the module with scheduled PrimFuncs (marked ``tirx.is_scheduled``).  A function the
        rule cannot handle is returned unchanged; this never raises for a valid module.
    """
    from tvm import relax, tirx
    updated = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        if func.attrs is not None and "tirx.is_scheduled" in func.attrs:
            continue
        try:
            if relax.analysis.has_reshape_pattern(func):
                continue
        except Exception:  # noqa: BLE001 - analysis unavailable: schedule it like the rest
            pass
        try:
            new, pars = _schedule_func(func, lanes, tile, parallel, min_parallel_work)
            if pars:
                ser, _ = _schedule_func(func, lanes, tile, False, min_parallel_work)
                guarded = _guard(new, ser, pars, min_parallel_work)
                new = guarded if guarded is not None else ser
        except Exception as e:  # noqa: BLE001 - fall back to the unscheduled function
            _debug(e)
            continue
        updated[gv] = new.with_attr("tirx.is_scheduled", True)
    for gv, f in updated.items():
        mod[gv] = f
    return mod
