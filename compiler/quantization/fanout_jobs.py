"""The jobs of the QAT fan-out (:mod:`.fanout`): what one (allocation x seed) fine-tune needs
(:class:`QatContext`, :class:`QatJob`), what it returns (:class:`JobResult`), running one
(:func:`run_job`), and the attempt / retry bookkeeping with its progress line (:class:`JobTracker`).

A job runs with :data:`JOB_THREADS` (one) torch intra-op thread and deterministic algorithms for its whole run (model
building, calibration, training, evaluation), seeds torch with ``seed + k`` before building its
model, and :func:`.qat.fine_tune` seeds its own shuffling generator: its result does not depend on
which process runs it or what that process ran before (torch docs, "Reproducibility":
``torch.manual_seed``, ``torch.use_deterministic_algorithms``).

Test hook: ``QatContext.kill_once = <job name>`` (the search sets it from the environment variable
``QDEPLOY_FANOUT_KILL_ONCE``) makes that job's first attempt ``os._exit(17)`` its worker process,
never in this process (``in_worker=False``), to exercise the retry path.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import QDeployError

__all__ = ["QatContext", "QatJob", "JobResult", "run_job", "JobTracker", "dumps_context", "loads_context",
           "failure_reason", "KILL_ENV", "ATTEMPTS", "JOB_THREADS"]

KILL_ENV = "QDEPLOY_FANOUT_KILL_ONCE"
ATTEMPTS = 2  # a job is tried at most twice (one retry)
JOB_THREADS = 1
"""torch intra-op threads of every QAT job, whichever engine runs it (serial included), so a result
never depends on the engine's thread count; local workers also get ``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS`` = this.  One, because these models are tiny: on the shared 2-core machine (loaded)
the digits MLP's 20-epoch fine-tune took 4.8 s with 1 thread and 24 s with 2 (same weights there, but
torch does not promise that in general), so N one-thread jobs on N cores is the way to use them."""


@dataclass
class QatContext:
    """What every QAT job of one search needs; pickled once and sent to each worker.

    Attributes:
        model: the trained float model (not modified).
        x_tr, y_tr: fine-tuning data (N, ...) float32 and (N,) int labels; ``x_tr[:ns]`` is the
            activation calibration data.
        x_va, y_va: validation data; test: ``(x, y)`` or None.
        inp: the model input format ``{"bits", "scale", "signed"}``.
        qcfg: checked QAT settings ``{"epochs", "lr", "batch_size", "distill_alpha", ...}``.
        ns: number of calibration samples.  seed: base seed (job k uses ``seed + k``).
        name: model name (job descriptions).  export: export the first seed's model as QONNX.
        recipe: the recipe spec when it is a string (workers load it before unpickling, so classes
            defined in a recipe file resolve).
        kill_once: job name whose first attempt kills its worker (test hook, see module docstring).
    """

    model: nn.Module
    x_tr: Any
    y_tr: Any
    x_va: Any
    y_va: Any
    test: Any
    inp: Mapping
    qcfg: Mapping
    ns: int
    seed: int
    name: str
    export: bool = True
    recipe: str | None = None
    kill_once: str | None = None


@dataclass(frozen=True)
class QatJob:
    """One fine-tune: allocation ``tag`` (e.g. ``"b0_hessian"``) with bits ``{layer: (w, a)}``, seed index ``k``;
    ``export=False``: never export its model (a comparison-only allocation), whatever ``QatContext.export``."""

    tag: str
    k: int
    bits: tuple  # sorted ((layer, (w, a)), ...): hashable and picklable
    export: bool = True

    @property
    def name(self) -> str:
        return f"{self.tag} seed {self.k}"


@dataclass
class JobResult:
    """Outcome of one job: per evaluation sample whether the QAT model classifies it right
    (``val_ok`` (N_val,) bool, ``test_ok`` (N_test,) bool or None), the job's wall time in seconds, the
    exported QONNX bytes (seed index 0 with export on for the context and the job, else None), which attempt (0, 1) succeeded, and
    the CPU seconds of the process that ran it (``time.process_time``) during the job."""

    val_ok: np.ndarray
    test_ok: np.ndarray | None
    seconds: float
    onnx: bytes | None = None
    cpu_seconds: float = 0.0
    attempt: int = 0
    worker: str = ""


def run_job(ctx: QatContext, job: QatJob, attempt: int = 0, in_worker: bool = False, progress=None) -> JobResult:
    """Build the QAT model of ``job``, fine-tune it, evaluate it (and export it for seed index 0).

    Runs with :data:`JOB_THREADS` torch threads and deterministic algorithms (restored afterwards), so its result
    does not depend on the process that runs it.  ``progress``: a rich Progress for the epoch bar.
    """
    from . import qat

    if in_worker and ctx.kill_once == job.name and attempt == 0:
        os._exit(17)  # test hook: a worker that dies mid-job
    prev_t, prev_d = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(JOB_THREADS)
    torch.use_deterministic_algorithms(True)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        bits = dict(job.bits)
        seed = int(ctx.seed) + int(job.k)
        q = ctx.qcfg
        torch.manual_seed(seed)
        qk = qat.build_qat_model(ctx.model, bits, input_bits=ctx.inp["bits"], input_scale=ctx.inp["scale"],
                                 input_signed=ctx.inp["signed"], calibration_x=ctx.x_tr[:ctx.ns])
        qat.fine_tune(qk, ctx.x_tr, ctx.y_tr, epochs=q["epochs"], lr=q["lr"], batch_size=q["batch_size"], seed=seed,
                      num_threads=JOB_THREADS, progress=progress, description=f"[{ctx.name}] QAT {job.tag} seed {seed}",
                      teacher=ctx.model if q.get("distill_alpha", 0.0) > 0 else None,
                      distill_alpha=q.get("distill_alpha", 0.0), distill_temperature=q.get("distill_temperature", 2.0))
        val_ok = qat.predict(qk, ctx.x_va).argmax(1) == np.asarray(ctx.y_va)
        test_ok = None
        if ctx.test is not None:
            test_ok = qat.predict(qk, ctx.test[0]).argmax(1) == np.asarray(ctx.test[1])
        onnx = None
        if ctx.export and job.export and job.k == 0:
            with tempfile.TemporaryDirectory(prefix="qdeploy-qat-") as d:
                p = qat.export_qonnx(qk, ctx.x_tr[:1], os.path.join(d, f"{ctx.name}_{job.tag}.onnx"))
                onnx = open(p, "rb").read()
    finally:
        torch.set_num_threads(prev_t)
        torch.use_deterministic_algorithms(prev_d)
    return JobResult(val_ok=val_ok, test_ok=test_ok, seconds=time.perf_counter() - t0, onnx=onnx, attempt=attempt,
                     worker=f"pid {os.getpid()}", cpu_seconds=time.process_time() - c0)


def dumps_context(ctx: QatContext) -> bytes:
    """``ctx`` pickled with cloudpickle (models or classes defined in ``__main__`` travel by value).

    Raises:
        QDeployError: something in it cannot be pickled (says to use one worker).
    """
    import cloudpickle
    try:
        return cloudpickle.dumps(ctx)
    except Exception as e:
        raise QDeployError(f"QAT fan-out: the recipe's model or data cannot be pickled for worker processes "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); use workers=1 "
                           "(--workers 1)") from None


def loads_context(blob: bytes, recipe: str | None) -> QatContext:
    """Unpickle a context in a worker; a string ``recipe`` is loaded first (a recipe file's module is
    registered under the name its classes were pickled with).  Raises what loading raises."""
    if recipe is not None:
        from .search_recipe import load_recipe
        load_recipe(recipe)  # registers a recipe file's module, so its classes unpickle
    return pickle.loads(blob)


def failure_reason(e: BaseException) -> str:
    """One line: the exception type and the last line of its message."""
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[-1] if s else ''}".strip()


class JobTracker:
    """Attempts, retries, failures and the progress line shared by the engines.

    ``next()`` takes the next job to run (``(job, attempt)``), ``ok(job, result)`` / ``fail(job, reason)``
    record its outcome: a first failure puts the job back at the front of the queue and is listed in
    ``retried``, a second in ``failed``.  ``todo`` is the queue, ``running`` the jobs out.
    """

    def __init__(self, jobs, progress, label):
        self.todo = deque(jobs)
        self.attempts = {j.name: 0 for j in jobs}
        self.results: dict[str, JobResult] = {}
        self.retried: list[dict] = []
        self.failed: list[dict] = []
        self.running = 0
        self.progress, self.label, self.total = progress, label, len(jobs)
        self.task = progress.add_task(self._desc(), total=len(jobs)) if progress is not None else None

    def _desc(self):
        return (f"{self.label} QAT jobs: {len(self.results)} done, {self.running} running, "
                f"{len(self.failed)} failed, {len(self.retried)} retried")

    def show(self):
        if self.task is not None:
            self.progress.update(self.task, completed=len(self.results) + len(self.failed), description=self._desc())

    def next(self):
        job = self.todo.popleft()
        a = self.attempts[job.name]
        self.attempts[job.name] += 1
        self.running += 1
        self.show()
        return job, a

    def ok(self, job, res):
        self.running -= 1
        self.results[job.name] = res
        self.show()

    def fail(self, job, why):
        self.running -= 1
        if self.attempts[job.name] < ATTEMPTS:
            self.retried.append({"job": job.name, "reason": why})
            self.todo.appendleft(job)
        else:
            self.failed.append({"job": job.name, "reason": why})
        self.show()

    def close(self):
        if self.task is not None:
            self.progress.remove_task(self.task)


