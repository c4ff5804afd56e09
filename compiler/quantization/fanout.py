"""QAT fan-out: the (allocation x seed) fine-tunes of the search as independent jobs, run in this
process, on a local pool of worker processes, or on a Ray cluster.

    results, info = run_qat_jobs(ctx, jobs, workers=2)       # {job.name: JobResult}, what ran
    results, info = run_qat_jobs(ctx, jobs, ray="auto")

The jobs and their context are in :mod:`.fanout_jobs`.  Engines:

* ``serial``: one worker (``workers=1``, or a single job / a single CPU with ``workers="auto"``)
  and no Ray: the jobs one after the other in this process.
* ``local``: ``workers=N > 1``: N worker processes (:class:`LocalPool`), each a fresh interpreter
  (no forked torch thread pools, and, unlike ``multiprocessing``'s spawn, the caller's main script is
  not re-run in it) that imports torch and Brevitas while it waits (the search starts the pool
  before its float training, so this overlaps it), is sent the pickled context once
  (``cloudpickle``: models or recipe classes defined in ``__main__`` or a recipe file travel too) and
  then one job at a time over a socket.  A worker that dies (killed, ``os._exit``, out of memory) is
  replaced by a fresh one.
* ``ray``: ``ray="auto"`` (this process's Ray if ``ray.init`` was called, else the running cluster
  ``ray.init(address="auto")`` finds), ``ray="local"`` (start a local Ray with ``workers`` CPUs, shut
  down afterwards) or a cluster address (``ray://host:10001``, ``host:6379``).  Each job is one Ray
  task with ``num_cpus=1`` (Ray docs, "Tasks", ``ray.remote(num_cpus=..., max_retries=...)``); the
  context goes to the object store once (``ray.put``); at most as many tasks are out as the cluster
  has CPUs, so "running" in the progress line is true.  Ray is optional: ``pip install qdeploy[ray]``.

Retries: a job that raises, or whose worker dies, is run once more (Ray's own retries are off,
``max_retries=0``, so every retry is counted here); ``info["retried"]`` lists each with its reason.
A job that fails twice goes to ``info["failed"]``; every other job still runs to its end, and then
:func:`run_qat_jobs` raises one :class:`~qdeploy.compiler.errors.QDeployError` naming the failed jobs.
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Sequence

import torch

from ..errors import QDeployError
from .fanout_jobs import (JOB_THREADS, JobResult, JobTracker, QatContext, QatJob, dumps_context, failure_reason,
                          loads_context, run_job)

__all__ = ["run_qat_jobs", "resolve_workers", "local_worker_main", "LocalPool", "ray_job", "ENGINES", "WARM_MODULES"]

ENGINES = ("serial", "local", "ray")


def resolve_workers(workers, n_jobs: int) -> int:
    """The number of local workers: ``workers`` (an int >= 1), or ``None`` / ``"auto"``: the CPUs this
    process may run on (``os.sched_getaffinity``), at most ``n_jobs`` and at least 1.

    Raises:
        QDeployError: ``workers`` is neither a positive integer nor ``"auto"``.
    """
    if workers is None or workers == "auto":
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
        return max(1, min(cpus, int(n_jobs)))
    if isinstance(workers, bool) or not isinstance(workers, (int, str)):
        raise QDeployError(f"workers must be a positive integer or 'auto', got {workers!r}")
    try:
        w = int(workers)
    except ValueError:
        w = 0
    if w < 1:
        raise QDeployError(f"workers must be a positive integer or 'auto', got {workers!r}")
    return w


def run_qat_jobs(ctx: QatContext, jobs: Sequence[QatJob], workers=None, ray: str | None = None,
                 progress=None, epoch_progress: bool = False,
                 pool: "LocalPool | None" = None) -> tuple[dict[str, JobResult], dict]:
    """Run every job (each failure retried once) and return ``({job.name: JobResult}, info)``.

    Args:
        ctx: the shared context.  jobs: the jobs (names unique).
        workers: local worker processes (int >= 1, or ``None`` / ``"auto"``: :func:`resolve_workers`);
            with ``ray="local"`` the CPUs of the Ray started here; with another Ray setting ignored
            (the cluster's CPUs count).
        ray: ``None`` (local engines), ``"auto"``, ``"local"`` or a Ray cluster address.
        progress: a rich ``Progress`` for the jobs line (done / running / failed / retried).
        epoch_progress: serial engine only: also show each job's epoch bar.
        pool: local engine: workers started earlier (:class:`LocalPool`, at least as many as used);
            closed here whichever engine runs (None: the local engine starts its own).

    The jobs that export (seed index 0 with ``ctx.export`` and ``job.export``; about half again as long) are handed out
    first, so the last jobs to finish are short ones (longest-first scheduling, Graham 1969).

    Returns:
        the results, and ``info`` = ``{"engine": "serial" | "local" | "ray", "workers", "ray_address",
        "jobs", "retried": [{"job", "reason"}], "failed": [], "seconds", "job_seconds", "job_cpu_seconds"}``
        (``workers``: processes for the local engines, the cluster's CPUs for Ray; ``seconds``: wall
        time of the fan-out; ``job_seconds`` / ``job_cpu_seconds``: the successful jobs' wall / CPU
        seconds summed).

    Raises:
        QDeployError: a job failed twice (raised after all other jobs ran), the context cannot be
            pickled, workers cannot load it, or Ray is asked for but not installed / not reachable.
    """
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise QDeployError("QAT fan-out: duplicate job names")
    if ray is not None and (not isinstance(ray, str) or not ray.strip()):
        raise QDeployError(f"ray must be 'auto', 'local' or a cluster address, got {ray!r}")
    t0 = time.perf_counter()
    if ray is not None:
        engine, nw = "ray", None
    else:
        nw = resolve_workers(workers, max(len(jobs), 1))
        engine = "serial" if nw == 1 or len(jobs) <= 1 else "local"
        nw = 1 if engine == "serial" else min(nw, len(jobs))
    address = None
    if pool is not None and (engine != "local" or len(pool.slots) < nw):
        pool.close()
        pool = None
    tr = JobTracker(sorted(jobs, key=lambda j: not (ctx.export and j.export and j.k == 0)), progress,
                    f"[{ctx.name}]")
    try:
        if engine == "serial":
            while tr.todo:
                job, a = tr.next()
                try:
                    tr.ok(job, run_job(ctx, job, a, progress=progress if epoch_progress else None))
                except Exception as e:  # a failed job: retried once, the others still run
                    tr.fail(job, failure_reason(e))
        elif engine == "local":
            _run_local(dumps_context(ctx), _portable_recipe(ctx.recipe), tr, nw, pool)
        else:
            nw, address = _run_ray(dumps_context(ctx), _portable_recipe(ctx.recipe), tr, ray, workers)
    finally:
        tr.close()
        if pool is not None:
            pool.close()
    info = {"engine": engine, "workers": nw, "ray_address": address, "jobs": len(jobs),
            "retried": tr.retried, "failed": tr.failed, "seconds": time.perf_counter() - t0,
            "job_seconds": sum(r.seconds for r in tr.results.values()),
            "job_cpu_seconds": sum(r.cpu_seconds for r in tr.results.values())}
    if tr.failed:
        raise QDeployError(f"QAT fan-out ({engine}): {len(tr.failed)} of {len(jobs)} jobs failed twice (the other "
                           "jobs finished): " + "; ".join(f"{f['job']}: {f['reason']}" for f in tr.failed))
    return tr.results, info


def _portable_recipe(recipe: str | None) -> str | None:
    """A recipe spec with its file path made absolute (workers may run in another directory)."""
    if recipe is None:
        return None
    mod, sep, fn = recipe.rpartition(":") if ":" in recipe else (recipe, "", "")
    p = Path(mod)
    if p.suffix in (".py", ".yaml", ".yml") or os.sep in mod:
        return str(p.resolve()) + sep + fn
    return recipe


# --------------------------------------------------------------------------- local process pool


WARM_MODULES = ("brevitas.nn", "brevitas.export", "onnx", "onnxscript", "qonnx.util.cleanup",
                "torch.onnx._internal.exporter._core", "qdeploy.compiler.quantization.qat",
                "qdeploy.compiler.frontends.brevitas")
"""Imported by a local worker before its context arrives (about 5 s of CPU per process, measured on the
2-core machine: brevitas.nn 2.7 s, the ONNX exporter's modules 2 s): with a pool started early
(:class:`LocalPool`) this overlaps the search's float training and Hessian traces instead of
delaying the first QAT job.  A name that does not import is skipped (it is only a warm-up)."""


def local_worker_main(fd: int) -> None:
    """Entry point of a local worker process (``python -c``; see :class:`LocalPool`): it imports
    :data:`WARM_MODULES`, then over the socket ``fd`` receives ``(sys.path, context blob, recipe)``,
    then jobs ``(job, attempt)`` until ``None``; it answers ``("ready" | "init_error" | "ok" | "error",
    job name, payload)``."""
    import importlib
    import sys
    from multiprocessing.connection import Connection

    torch.set_num_threads(JOB_THREADS)
    for mod in WARM_MODULES:
        try:
            importlib.import_module(mod)
        except Exception:  # noqa: BLE001 -- a warm-up only; the job imports what it needs itself
            pass
    conn = Connection(fd)
    try:
        msg = conn.recv()
    except EOFError:
        return  # the pool was closed before any job was sent (e.g. the search failed early)
    if msg is None:
        return
    try:
        path, blob, recipe = msg
        sys.path[:] = path  # as the parent's: modules its classes come from import here too
        ctx = loads_context(blob, recipe)
    except BaseException as e:  # noqa: BLE001 -- reported to the parent, which stops
        conn.send(("init_error", None, failure_reason(e)))
        return
    conn.send(("ready", None, None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        job, attempt = msg
        try:
            res = run_job(ctx, job, attempt, in_worker=True)
        except Exception as e:  # noqa: BLE001 -- the parent retries the job
            conn.send(("error", job.name, failure_reason(e)))
            continue
        conn.send(("ok", job.name, res))


class LocalPool:
    """N local worker processes, started when the pool is made and reused for every job of one search.

    Each worker is a fresh interpreter started with ``subprocess`` (not multiprocessing's spawn or
    forkserver, which re-run the caller's main script in every child: a script without an
    ``if __name__ == "__main__"`` guard would start the search again there; not fork, since the
    parent's OpenMP thread pool does not survive a fork), talking over a socket pair.  It runs with
    ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` = :data:`.fanout_jobs.JOB_THREADS` (set before torch is
    imported there), so N workers use N cores, imports :data:`WARM_MODULES` and waits for the search
    context.  :func:`.search.run_search` makes the pool before it runs the recipe, so the workers'
    start-up (about 8 s of CPU each) overlaps the float training and Hessian traces.

    Use as a context manager (or call :meth:`close`): workers still waiting are told to stop, a stuck
    one is killed by its handle.  ``n``: the number of workers (>= 2 makes sense).
    """

    def __init__(self, n: int):
        self.n = int(n)
        self.slots: list[dict] = []
        try:
            for _ in range(self.n):
                self.slots.append(self.start())
        except BaseException:
            self.close()
            raise

    @staticmethod
    def start() -> dict:
        """One fresh worker process (a slot ``{"proc", "conn", "job", "sent"}``); its context not yet sent."""
        import socket
        import subprocess
        import sys
        from multiprocessing.connection import Connection

        mine, theirs = socket.socketpair()
        fd = theirs.fileno()
        env = {**os.environ, "OMP_NUM_THREADS": str(JOB_THREADS), "MKL_NUM_THREADS": str(JOB_THREADS)}
        try:
            p = subprocess.Popen([sys.executable, "-c", "from qdeploy.compiler.quantization.fanout import "
                                  f"local_worker_main; local_worker_main({fd})"], pass_fds=(fd,), env=env,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        finally:
            theirs.close()
        return {"proc": p, "conn": Connection(mine.detach()), "job": None, "sent": False}

    def close(self) -> None:
        """Stop every worker (idempotent): each is told to stop; one that never got the context (still
        starting up, or not needed) or is mid-job (an error path) is terminated by its handle at once,
        one that does not exit within 10 s is killed."""
        import subprocess
        for s in self.slots:
            if not s.get("dead"):
                try:
                    s["conn"].send(None)
                    s["conn"].close()
                except OSError:
                    pass
                s["dead"] = True
        for s in self.slots:
            if not s.get("sent") or s.get("job") is not None:
                s["proc"].terminate()  # our own child (no-op once it has exited)
            try:
                s["proc"].wait(timeout=10)
            except subprocess.TimeoutExpired:  # our own child, stuck: stop it by its handle
                s["proc"].kill()
                s["proc"].wait()
        self.slots = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _run_local(blob: bytes, recipe: str | None, tr: JobTracker, n: int, pool: LocalPool | None = None) -> None:
    """The jobs on ``n`` workers of ``pool`` (a pool of ``n`` made here when None; closed at the end
    either way); a worker that dies is replaced by a fresh one."""
    import subprocess
    import sys
    from multiprocessing.connection import wait

    own = pool is None
    pool = LocalPool(n) if own else pool
    first = (list(sys.path), blob, recipe)

    def send_context(s):
        s["conn"].send(first)
        s["sent"] = True

    def died(s):
        try:
            code = s["proc"].wait(timeout=10)
        except subprocess.TimeoutExpired:
            s["proc"].kill()  # our own child, its socket closed: stop it by its handle
            code = s["proc"].wait()
        if s["job"] is not None:
            tr.fail(s["job"], f"worker process died (exit code {code})")
            s["job"] = None
        s["conn"].close()
        s["dead"] = True

    slots = pool.slots
    try:
        while tr.todo or tr.running:
            for i, s in enumerate(slots[:n]):
                if s.get("dead") and tr.todo:
                    s = slots[i] = pool.start()  # a fresh worker for the next job
                if not s.get("dead") and s["job"] is None and tr.todo:
                    job, a = tr.next()
                    s["job"] = job
                    try:
                        if not s["sent"]:
                            send_context(s)
                        s["conn"].send((job, a))
                    except OSError:
                        died(s)
            live = [s for s in slots[:n] if not s.get("dead")]
            for c in wait([s["conn"] for s in live], timeout=1.0):
                s = next(s for s in live if s["conn"] is c)
                try:
                    kind, _, payload = c.recv()
                except (EOFError, OSError):  # the worker is gone
                    died(s)
                    continue
                if kind == "init_error":
                    raise QDeployError(f"a QAT worker process could not load the search context: {payload}; "
                                       "use workers=1 (--workers 1)")
                if kind in ("ok", "error"):
                    job, s["job"] = s["job"], None
                    tr.ok(job, payload) if kind == "ok" else tr.fail(job, payload)
    finally:
        pool.close()


# --------------------------------------------------------------------------- Ray

_RAY_CONTEXTS: dict = {}  # context id -> QatContext, per Ray worker process


def ray_job(blob: bytes, recipe: str | None, key: str, job: QatJob, attempt: int) -> JobResult:
    """The body of one Ray task: the context (unpickled once per worker process) and :func:`run_job`."""
    ctx = _RAY_CONTEXTS.get(key)
    if ctx is None:
        _RAY_CONTEXTS.clear()
        ctx = _RAY_CONTEXTS[key] = loads_context(blob, recipe)
    return run_job(ctx, job, attempt, in_worker=True)


def _run_ray(blob: bytes, recipe: str | None, tr: JobTracker, where: str, workers) -> tuple[int, str]:
    try:
        import ray
    except ImportError:
        raise QDeployError("--ray needs Ray, an optional extra: pip install 'qdeploy[ray]'") from None
    started = False
    if not ray.is_initialized():
        try:
            if where == "local":
                ray.init(num_cpus=resolve_workers(workers, 1 << 30), include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=where, log_to_driver=False)
        except Exception as e:  # noqa: BLE001 -- one line for the user
            raise QDeployError(f"--ray {where}: cannot start or reach a Ray cluster: {failure_reason(e)}") from None
        started = True
    try:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        address = ray.get_runtime_context().gcs_address
        task = ray.remote(num_cpus=1, max_retries=0)(ray_job)
        ref, key = ray.put(blob), uuid.uuid4().hex
        out: dict = {}
        while tr.todo or out:
            while tr.todo and len(out) < cpus:
                job, a = tr.next()
                out[task.remote(ref, recipe, key, job, a)] = job
            done, _ = ray.wait(list(out), num_returns=1, timeout=1.0)
            for r in done:
                job = out.pop(r)
                try:
                    tr.ok(job, ray.get(r))
                except ray.exceptions.RayError as e:  # the task raised, or its worker died
                    cause = getattr(e, "cause", None)
                    tr.fail(job, failure_reason(cause) if isinstance(cause, Exception) else failure_reason(e))
        return cpus, address
    finally:
        if started:
            ray.shutdown()
