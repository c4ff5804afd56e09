"""`MultiStageModel`: a small host-level control plan whose stages are compiled artifacts.

Made for early exits and kept general for dynamic control flow.  On disk a
multi-stage program is one directory::

    plan.json            the control plan (below)
    ir/program.{json,npz} the whole (unsplit) IR graph: defines the program inputs/outputs, their
                         layouts and types, and is the host-side oracle in tests
    <stage dir>/         one compiled artifact per stage (any target: manifest.json, ...)

``plan.json``::

    {"format": 1, "kind": "early_exit", "target": "tvm-llvm",
     "inputs": ["global_in"],                    # program inputs (IR names of ir/program)
     "stages": [{"name": "stage0", "dir": "stage0", "inputs": [...], "outputs": [...],
                 "cost": {"bops": ..., "cum_bops": ..., ...}}, ...],
     "steps":  [{"run": "stage0",
                 "exit": {"value": "exit_pool1", "gate": {"rule": "max_softmax", "level": ..., ...}}},
                ...,
                {"run": "stage2", "exit": {"value": "exit_final", "gate": {"rule": "always"}}}],
     "meta": {...}}

Execution (:meth:`MultiStageModel.predict`): the host keeps an environment of named runtime
arrays (int64 codes for fixed-point values, float32 otherwise) for the whole batch, plus the set
of *active* (undecided) inputs.  A step runs its stage on the active rows only, storing the
stage outputs; its ``exit`` gate then retires the active rows it accepts, recording the argmax of
the exit value and the step index.  Rows still active after the last step are an error (the
last gate must be ``always``).  New gate rules go into :data:`GATES`.

Shared with dynamic networks: :class:`StageHost` (stage calls by name, per-sample
row routing and scattering, the ``plan.json`` + stage-artifact layout through :func:`read_plan`,
:func:`write_plan`, :func:`load_stages`) is the base of both ``MultiStageModel`` and
:class:`~qdeploy.runtime.dynamic.DynamicModel` (whose ``plan.json`` has ``kind: "dynamic"`` and
a nested ``control`` graph instead of ``steps``).

Gating in the integer domain (``GATES``): with fixed-point logits ``z_j = c_j * 2^-F`` (codes
``c_j``) and integer gaps ``d_j = c_max - c_j >= 0``:

* ``max_softmax``: ``p_max = 1 / S`` with ``S = sum_j exp(-d_j 2^-F)``.  The host sums the
  integer table ``L(d) = round(2^Q exp(-d 2^-F))`` (``Q = lut_bits``, default 16; the table an
  FPGA or MCU would store): ``A = sum_j L(d_j)``, an exact integer.  The gate exits when
  ``A <= T`` with the integer ``T = floor(2^Q / t)``; confidence ``-A``, level ``-T``.  It equals the
  float rule ``p_max >= t`` except when ``|S - 1/t| <= K 2^-(Q+1)`` (K classes): each table
  entry is off by at most half an LSB (``tests/early_exit`` checks the band).
* ``entropy``: normalized entropy ``H / ln K`` with ``H = ln S + (sum_j d_j 2^-F exp(-d_j 2^-F)) / S``
  computed from the two integer table sums ``A`` and ``B = sum_j round(2^Q d_j 2^-F exp(-d_j 2^-F))``
  as ``ln(A / 2^Q) + B / A`` in float64: a deterministic function of the integer codes;
  exits when ``H / ln K <= tau`` (confidence ``-H/ln K``, level ``-tau``).
* ``margin``: ``c_top1 - c_top2 >= m`` in codes, pure integer (confidence = the code margin).
* ``always`` / ``never``.

Every decision is a function of the stage's integer output codes only, so stages that are
bit-exact across targets give identical exits on every target.  Float (unquantized) exit values
use the same formulas on the float logits.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..compiler.errors import QDeployError
from ..compiler.ir.graph import Graph
from ..compiler.ir.types import FixedType

PLAN_FORMAT = 1
DEFAULT_LUT_BITS = 16


class PlanError(QDeployError):
    """A malformed or inconsistent multi-stage plan."""


# --------------------------------------------------------------------------- gates
def _gaps(arr, dtype):
    """(gaps d_j >= 0 as exact ints or floats, scale s) with logits = -d * s + max."""
    a = np.asarray(arr)
    if isinstance(dtype, FixedType):
        c = a.astype(np.int64)
        return c.max(axis=1, keepdims=True) - c, math.ldexp(1.0, -dtype.frac_bits)
    f = a.astype(np.float64)
    return f.max(axis=1, keepdims=True) - f, 1.0


def lut_sums(arr, dtype, lut_bits: int = DEFAULT_LUT_BITS):
    """Integer table sums ``A = sum round(2^Q e^{-d s})`` and ``B = sum round(2^Q d s e^{-d s})``
    per row (int64 arrays).  For a fixed-point ``dtype`` ``d`` are integer code gaps, so each table
    entry depends on an integer only (what a hardware LUT indexed by ``d`` would hold)."""
    d, s = _gaps(arr, dtype)
    x = d.astype(np.float64) * s
    e = np.exp(-x)
    one = float(2 ** lut_bits)
    a = np.rint(one * e).astype(np.int64).sum(axis=1)
    b = np.rint(one * x * e).astype(np.int64).sum(axis=1)
    return a, b


def _conf_max_softmax(arr, dtype, g):
    a, _ = lut_sums(arr, dtype, int(g.get("lut_bits", DEFAULT_LUT_BITS)))
    return -a


def _conf_entropy(arr, dtype, g):
    q = int(g.get("lut_bits", DEFAULT_LUT_BITS))
    a, b = lut_sums(arr, dtype, q)
    k = np.asarray(arr).shape[1]
    h = np.log(a.astype(np.float64) / float(2 ** q)) + b.astype(np.float64) / a.astype(np.float64)
    return -h / math.log(k)


def _conf_margin(arr, dtype, g):
    d, _ = _gaps(arr, dtype)
    srt = np.sort(d, axis=1)
    return srt[:, 1] if srt.shape[1] > 1 else np.full(srt.shape[0], np.inf)


def _level_max_softmax(t, dtype, g):
    """Probability threshold t -> level -T, T = floor(2^Q / t)."""
    if not 0 < t <= 1:
        raise PlanError(f"max_softmax threshold must be in (0, 1], got {t}")
    return -int(math.floor(2 ** int(g.get("lut_bits", DEFAULT_LUT_BITS)) / t))


def _level_entropy(t, dtype, g):
    if not 0 <= t <= 1:
        raise PlanError(f"entropy threshold (normalized entropy) must be in [0, 1], got {t}")
    return -float(t)


def _level_margin(m, dtype, g):
    if isinstance(dtype, FixedType):
        return int(math.ceil(float(m) * 2 ** dtype.frac_bits))
    return float(m)


def _readable_max_softmax(level, dtype, g):
    return 2 ** int(g.get("lut_bits", DEFAULT_LUT_BITS)) / -level if level else 0.0


#: rule -> (confidence(arr, dtype, gate) -> array (higher = surer), threshold -> level,
#: level -> readable threshold).  A row exits when ``confidence >= level``.
GATES = {
    "max_softmax": (_conf_max_softmax, _level_max_softmax, _readable_max_softmax),
    "entropy": (_conf_entropy, _level_entropy, lambda lv, dt, g: -lv),
    "margin": (_conf_margin, _level_margin,
               lambda lv, dt, g: lv * 2.0 ** -dt.frac_bits if isinstance(dt, FixedType) else lv),
}


def confidence(rule: str, arr, dtype, gate: dict | None = None) -> np.ndarray:
    """Confidence of each row of the exit value ``arr`` (runtime array) under ``rule``."""
    if rule not in GATES:
        raise PlanError(f"unknown gate rule {rule!r}; known: always, never, {', '.join(GATES)}")
    return GATES[rule][0](arr, dtype, gate or {})


def make_gate(rule: str, dtype, threshold=None, level=None, lut_bits: int = DEFAULT_LUT_BITS) -> dict:
    """A gate dict for the plan from a human threshold (probability for ``max_softmax``,
    normalized entropy for ``entropy``, logit margin in real units for ``margin``) or an internal
    ``level`` (as returned by calibration).  ``level=inf`` means never exit."""
    if rule in ("always", "never"):
        return {"rule": rule}
    if rule not in GATES:
        raise PlanError(f"unknown gate rule {rule!r}; known: always, never, {', '.join(GATES)}")
    g = {"rule": rule, "lut_bits": int(lut_bits)}
    if level is None:
        if threshold is None:
            raise PlanError(f"gate {rule!r} needs a threshold")
        level = GATES[rule][1](threshold, dtype, g)
    if isinstance(level, float) and math.isinf(level):
        return {"rule": "never"}
    g["level"] = int(level) if isinstance(level, (int, np.integer)) else float(level)
    g["threshold"] = float(GATES[rule][2](g["level"], dtype, g))
    return g


def gate_mask(gate: dict | None, arr, dtype) -> np.ndarray:
    """Boolean mask of the rows that exit under ``gate`` (None = always)."""
    n = np.asarray(arr).shape[0]
    rule = (gate or {"rule": "always"}).get("rule")
    if rule == "always":
        return np.ones(n, dtype=bool)
    if rule == "never":
        return np.zeros(n, dtype=bool)
    if "level" not in gate:
        raise PlanError(f"gate {gate} has no level")
    return confidence(rule, arr, dtype, gate) >= gate["level"]


# --------------------------------------------------------------------------- shared host layer
def read_plan(out_dir, kind: str | None = None) -> dict:
    """Parse ``out_dir/plan.json`` (format :data:`PLAN_FORMAT`; ``kind`` checked when given:
    ``"early_exit"`` or ``"dynamic"``).

    Raises:
        PlanError: no/unreadable plan, another format or kind.
    """
    pf = Path(out_dir) / "plan.json"
    if not pf.is_file():
        raise PlanError(f"{out_dir} is not a multi-stage program: no plan.json")
    try:
        plan = json.loads(pf.read_text())
    except (OSError, ValueError) as e:
        raise PlanError(f"{out_dir}: unreadable multi-stage program ({type(e).__name__}: {e})") from None
    if plan.get("format") != PLAN_FORMAT:
        raise PlanError(f"{pf}: unsupported plan format {plan.get('format')!r}")
    if kind is not None and plan.get("kind", "early_exit") != kind:
        raise PlanError(f"{pf}: a {plan.get('kind')!r} plan, not {kind!r}")
    return plan


def write_plan(out_dir, plan: dict) -> Path:
    """Write ``plan`` to ``out_dir/plan.json`` (adds ``format``); returns the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = {"format": PLAN_FORMAT, **plan}
    (out_dir / "plan.json").write_text(json.dumps(plan, indent=1, default=str))
    return out_dir / "plan.json"


def load_stages(out_dir, plan: dict) -> dict:
    """``{stage name: CompiledModel}`` for every ``plan["stages"]`` entry (``dir`` relative to
    ``out_dir``).

    Raises:
        PlanError: a stage directory that is not a compiled artifact.
    """
    from .artifact import ArtifactError
    from .compiled import CompiledModel
    out = {}
    for s in plan.get("stages", []):
        try:
            out[s["name"]] = CompiledModel.load(Path(out_dir) / s["dir"])
        except ArtifactError as e:
            raise PlanError(f"stage {s['name']!r}: {e}") from None
    return out


class StageHost:
    """The host side shared by :class:`MultiStageModel` (early exits) and
    :class:`~qdeploy.runtime.dynamic.DynamicModel` (dynamic control flow, DyCL arXiv
    2307.04963): compiled stages called by name, per-sample routing of a batch through them,
    and the ``plan.json`` + stage-artifact layout on disk (:func:`read_plan`,
    :func:`write_plan`, :func:`load_stages`).

    Attributes:
        stages: ``{name: stage}``; a stage is a :class:`CompiledModel` (``run_codes``) or a
            backend ``load`` callable ``feeds -> outputs`` (runtime arrays, IR layout, batch first).
        stage_calls: stage calls made since the object was created (all paths).
    """

    stages: dict
    stage_calls: int = 0

    def call_stage(self, name: str, feeds: dict) -> dict:
        """Run stage ``name`` on ``{IR input name: array (rows, ...)}``; ``{IR output: array}``.

        Raises:
            PlanError: unknown stage.
        """
        st = self.stages.get(name)
        if st is None:
            raise PlanError(f"unknown stage {name!r}")
        self.stage_calls += 1
        run = getattr(st, "run_codes", None)
        return run(feeds) if run is not None else st(feeds)

    @staticmethod
    def route(rows: np.ndarray, mask: np.ndarray) -> tuple:
        """Split the sample indices ``rows`` by a per-sample boolean ``mask`` (same length):
        ``(rows taking the true side, rows taking the false side)``."""
        mask = np.asarray(mask, dtype=bool)
        return rows[mask], rows[~mask]

    @staticmethod
    def scatter(env: dict, outs: dict, rows: np.ndarray, n: int) -> None:
        """Store stage outputs computed on ``rows`` into the batch-``n`` environment ``env``
        (a value first seen is allocated zero-filled for the whole batch)."""
        for o, a in outs.items():
            a = np.asarray(a)
            full = env.get(o)
            if full is None or full.shape[0] != n:
                full = np.zeros((n, *a.shape[1:]), dtype=a.dtype)
                env[o] = full
            full[rows] = a


# --------------------------------------------------------------------------- the model
class MultiStageModel(StageHost):
    """A multi-stage program: stages (compiled artifacts, :class:`CompiledModel`) under a host
    control plan.  Build one with :func:`qdeploy.early_exit.compile_early_exit` (or
    :meth:`save` a plan next to compiled stage directories), load it with :meth:`load`.

    Attributes:
        plan: the parsed ``plan.json``.
        program: the whole IR graph (program inputs/outputs, layouts, types).
        stages: ``{stage name: CompiledModel}`` (or any object with ``run_codes`` and ``graph``).
    """

    def __init__(self, plan: dict, program: Graph, stages: dict, out_dir=None):
        self.plan = plan
        self.program = program
        self.stages = stages
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self._check()

    # ---------------------------------------------------------------- persistence
    @classmethod
    def load(cls, out_dir) -> "MultiStageModel":
        """Load ``out_dir/plan.json``, ``out_dir/ir/program`` and every stage artifact.

        Raises:
            PlanError: missing/unreadable plan or a stage directory that is not an artifact.
        """
        from .compiled import CompiledModel
        out_dir = Path(out_dir)
        plan = read_plan(out_dir)
        try:
            program = Graph.load(str(out_dir / "ir" / "program"))
        except (OSError, ValueError, KeyError) as e:
            raise PlanError(f"{out_dir}: unreadable multi-stage program ({type(e).__name__}: {e})") from None
        stages = {s["name"]: CompiledModel.load(out_dir / s["dir"]) for s in plan["stages"]}
        return cls(plan, program, stages, out_dir)

    def save_plan(self, out_dir=None) -> Path:
        """Write ``plan.json`` and ``ir/program`` (stage artifacts are written by the compiler)."""
        out_dir = Path(out_dir or self.out_dir)
        (out_dir / "ir").mkdir(parents=True, exist_ok=True)
        self.program.save(str(out_dir / "ir" / "program"))
        return write_plan(out_dir, self.plan)

    def with_gates(self, gates: list) -> "MultiStageModel":
        """A copy with the exit gates replaced, one gate dict per step (the same compiled stages)."""
        if len(gates) != len(self.plan["steps"]):
            raise PlanError(f"need {len(self.plan['steps'])} gates, got {len(gates)}")
        plan = json.loads(json.dumps(self.plan))
        for st, g in zip(plan["steps"], gates):
            st["exit"]["gate"] = dict(g)
        return MultiStageModel(plan, self.program, self.stages, self.out_dir)

    def _check(self):
        names = {s["name"] for s in self.plan.get("stages", [])}
        if not self.plan.get("steps"):
            raise PlanError("plan has no steps")
        for i, st in enumerate(self.plan["steps"]):
            if st.get("run") not in names or st["run"] not in self.stages:
                raise PlanError(f"step {i} runs unknown stage {st.get('run')!r}")
        last = self.plan["steps"][-1].get("exit", {}).get("gate") or {"rule": "always"}
        if last.get("rule") != "always":
            raise PlanError(f"the last step's gate must be 'always' (got {last.get('rule')!r}): "
                            f"every input has to leave somewhere")

    @property
    def gates(self) -> list:
        return [st["exit"].get("gate") or {"rule": "always"} for st in self.plan["steps"]]

    def exit_values(self) -> list[str]:
        return [st["exit"]["value"] for st in self.plan["steps"]]

    # ---------------------------------------------------------------- running
    def _value_type(self, name):
        return self.program.value(name).dtype

    def predict(self, *inputs, return_logits: bool = False):
        """Run the program on real-valued inputs (batch first, the source model's layout).

        Stage ``k`` runs only on the inputs no earlier gate accepted.

        Returns:
            ``(predictions, exit_index)`` int64 arrays of shape (N,), plus with
            ``return_logits`` the real-valued logits of the exit each input left at (N, K).
        """
        from .compiled import user_feeds
        x = inputs[0] if len(inputs) == 1 else list(inputs)
        feeds = user_feeds(self.program, x)
        return self.run_codes(feeds, return_logits=return_logits)

    def run_codes(self, feeds: dict, return_logits: bool = False):
        """:meth:`predict` on runtime arrays of the program inputs (codes, IR layout)."""
        n = next(iter(feeds.values())).shape[0]
        env = {k: np.asarray(v) for k, v in feeds.items()}
        active = np.arange(n)
        pred = np.full(n, -1, dtype=np.int64)
        exit_idx = np.full(n, -1, dtype=np.int64)
        logits = None
        self.last_stage_rows = []
        for k, st in enumerate(self.plan["steps"]):
            if active.size == 0:
                self.last_stage_rows.append(0)
                continue
            self.last_stage_rows.append(int(active.size))
            done, out_arr = self._step(st, env, active)
            rows, rest = self.route(active, done)
            pred[rows] = np.argmax(out_arr[done], axis=1)
            exit_idx[rows] = k
            if return_logits:
                t = self._value_type(st["exit"]["value"])
                real = t.to_real(out_arr[done]) if isinstance(t, FixedType) else out_arr[done].astype(np.float64)
                if logits is None:
                    logits = np.zeros((n, real.shape[1]), dtype=np.float64)
                logits[rows] = real
            active = rest
        if active.size:
            raise PlanError(f"{active.size} inputs left no exit (last gate must be 'always')")
        return (pred, exit_idx, logits) if return_logits else (pred, exit_idx)

    def _step(self, st: dict, env: dict, active: np.ndarray):
        """Run one step on the ``active`` rows: (exit mask over active rows, exit value rows)."""
        stage = self.stages[st["run"]]
        g = stage.graph
        feeds = {}
        for i in g.inputs:
            if i not in env:
                raise PlanError(f"stage {st['run']!r} needs {i!r}, which no earlier stage produced")
            feeds[i] = _rows(env[i], active, self._n(env))
        outs = self.call_stage(st["run"], feeds)
        self.scatter(env, outs, active, self._n(env))
        ev = st["exit"]["value"]
        arr = np.asarray(outs[ev])
        return gate_mask(st["exit"].get("gate"), arr, self._value_type(ev)), arr

    @staticmethod
    def _n(env):
        return next(iter(env.values())).shape[0]

    def decide(self, exit_arrays: dict) -> tuple[np.ndarray, np.ndarray]:
        """Host gating on precomputed exit values of *every* input (e.g. from running the whole
        unsplit network): the same gates, applied in step order.  Returns (predictions, exits)."""
        n = np.asarray(exit_arrays[self.exit_values()[0]]).shape[0]
        pred = np.full(n, -1, dtype=np.int64)
        ex = np.full(n, -1, dtype=np.int64)
        undecided = np.ones(n, dtype=bool)
        for k, (v, g) in enumerate(zip(self.exit_values(), self.gates)):
            arr = np.asarray(exit_arrays[v])
            m = gate_mask(g, arr, self._value_type(v)) & undecided
            pred[m] = np.argmax(arr[m], axis=1)
            ex[m] = k
            undecided &= ~m
        return pred, ex


def _rows(arr, active, n):
    return arr if active.size == n else arr[active]
