"""QAT fan-out: the (allocation x seed) fine-tunes of the search as independent jobs, run in this
process, on a local pool of worker processes, or on a Ray cluster.

    results, info = run_qat_jobs(ctx, jobs, workers=2)       # {job.name: JobResult}, what ran
    results, info = run_qat_jobs(ctx, jobs, ray="auto")

The jobs and their context are in :mod:`.fanout_jobs`.  Engines:

* ``serial``: one worker (``workers=1``, or a single job / a single CPU with ``workers="auto"``)
  and no Ray: the jobs one after the other in this process.
* ``local``: ``workers=N > 1``: N worker processes, each a fresh interpreter (no forked torch
  thread pools, and, unlike ``multiprocessing``'s spawn, the caller's main script is not re-run
  in it), sent the pickled context once (``cloudpickle``: models or recipe classes defined in
  ``__main__`` or a recipe file travel too) and then one job at a time over a socket.  A worker
  that dies (killed, ``os._exit``, out of memory) is replaced by a fresh one.
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
from .fanout_jobs import (JobResult, JobTracker, QatContext, QatJob, dumps_context, failure_reason, loads_context,
                          run_job)

__all__ = ["run_qat_jobs", "resolve_workers", "local_worker_main", "ray_job", "ENGINES"]

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
                 progress=None, epoch_progress: bool = False) -> tuple[dict[str, JobResult], dict]:
    """Run every job (each failure retried once) and return ``({job.name: JobResult}, info)``.

    Args:
        ctx: the shared context.  jobs: the jobs (names unique).
        workers: local worker processes (int >= 1, or ``None`` / ``"auto"``: :func:`resolve_workers`);
            with ``ray="local"`` the CPUs of the Ray started here; with another Ray setting ignored
            (the cluster's CPUs count).
        ray: ``None`` (local engines), ``"auto"``, ``"local"`` or a Ray cluster address.
        progress: a rich ``Progress`` for the jobs line (done / running / failed / retried).
        epoch_progress: serial engine only: also show each job's epoch bar.

    Returns:
        the results, and ``info`` = ``{"engine": "serial" | "local" | "ray", "workers", "ray_address",
        "jobs", "retried": [{"job", "reason"}], "failed": [], "seconds"}`` (``workers``: processes for
        the local engines, the cluster's CPUs for Ray).

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
    tr = JobTracker(jobs, progress, f"[{ctx.name}]")
    try:
        if engine == "serial":
            while tr.todo:
                job, a = tr.next()
                try:
                    tr.ok(job, run_job(ctx, job, a, progress=progress if epoch_progress else None))
                except Exception as e:  # a failed job: retried once, the others still run
                    tr.fail(job, failure_reason(e))
        elif engine == "local":
            _run_local(dumps_context(ctx), _portable_recipe(ctx.recipe), tr, nw)
        else:
            nw, address = _run_ray(dumps_context(ctx), _portable_recipe(ctx.recipe), tr, ray, workers)
    finally:
        tr.close()
    info = {"engine": engine, "workers": nw, "ray_address": address, "jobs": len(jobs),
            "retried": tr.retried, "failed": tr.failed, "seconds": time.perf_counter() - t0}
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


def local_worker_main(fd: int) -> None:
    """Entry point of a local worker process (``python -c``; see :func:`_run_local`): over the socket
    ``fd`` it receives ``(sys.path, context blob, recipe)``, then jobs ``(job, attempt)`` until
    ``None``; it answers ``("ready" | "init_error" | "ok" | "error", job name, payload)``."""
    import sys
    from multiprocessing.connection import Connection

    torch.set_num_threads(1)
    conn = Connection(fd)
    try:
        path, blob, recipe = conn.recv()
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


def _run_local(blob: bytes, recipe: str | None, tr: JobTracker, n: int) -> None:
    """N worker processes, each a fresh interpreter started with ``subprocess`` (not multiprocessing's
    spawn, which re-runs the caller's main script in every child: a script without an
    ``if __name__ == "__main__"`` guard would start the search again there), talking over a socket
    pair; a worker that dies is replaced."""
    import socket
    import subprocess
    import sys
    from multiprocessing.connection import Connection, wait

    def start():
        mine, theirs = socket.socketpair()
        fd = theirs.fileno()
        p = subprocess.Popen([sys.executable, "-c", "import sys; from qdeploy.compiler.quantization.fanout import "
                              f"local_worker_main; local_worker_main({fd})"], pass_fds=(fd,),
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        theirs.close()
        conn = Connection(mine.detach())
        conn.send((list(sys.path), blob, recipe))
        return {"proc": p, "conn": conn, "job": None}

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

    slots = [start() for _ in range(n)]
    try:
        while tr.todo or tr.running:
            for i, s in enumerate(slots):
                if s.get("dead") and tr.todo:
                    s = slots[i] = start()  # a fresh worker for the next job
                if not s.get("dead") and s["job"] is None and tr.todo:
                    job, a = tr.next()
                    s["job"] = job
                    try:
                        s["conn"].send((job, a))
                    except OSError:
                        died(s)
            live = [s for s in slots if not s.get("dead")]
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
        for s in slots:
            if not s.get("dead"):
                try:
                    s["conn"].send(None)
                    s["conn"].close()
                except OSError:
                    pass
        for s in slots:
            try:
                s["proc"].wait(timeout=10)
            except subprocess.TimeoutExpired:  # our own child, stuck: stop it by its handle
                s["proc"].kill()
                s["proc"].wait()


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
