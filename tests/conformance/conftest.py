"""Shared machinery of the conformance suite.

* :data:`BACKENDS` / :func:`backend_params` -- every registered target, the hls4ml one marked
  xfail (with the reason) when its backend cannot even be imported;
* :func:`compile_graph` -- the backend contract end to end (``emit -> build -> load``) into a
  fresh directory; :class:`CompileCache` (fixture ``compiled``) reuses each build for the
  whole session, keyed by backend and graph digest;
* :func:`random_feeds` -- seeded runtime arrays (full-range codes, float reals on power-of-two
  grids at many scales so that every rounding tie and overflow really happens);
* :func:`compare` -- exact comparison against the reference interpreter, recorded in a
  session ledger that the terminal summary prints (models x backends x bit widths,
  compared values, mismatches).  ``QDEPLOY_CONFORMANCE_LEDGER=path.json`` also writes it.
* :class:`Wide` -- "many small models in one": cases (each its own inputs/outputs, names
  prefixed) are classified per backend with a cheap ``emit`` (cases a backend rejects with
  :class:`UnsupportedError` are set aside), the accepted ones are merged into one wide graph
  and compiled ONCE per backend -- hls4ml builds cost 5-15 s each.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from qdeploy.backends import TARGETS, get_backend
from qdeploy.compiler import reference as ref
from qdeploy.compiler.errors import UnsupportedError
from qdeploy.compiler.ir import GraphBuilder
from qdeploy.compiler.ir.types import FixedType, FloatType

#: targets that need a device this machine may not have: in the suite only with QDEPLOY_GPU=1
#: (scripts/gpu_check.sh sets it on a GPU machine; there a missing device FAILS every case).  Without
#: it tvm-cuda is checked here by its build test (tests/backends/test_tvm_cuda.py: the library
#: builds, its CUDA source compiles with nvcc) -- not for exactness, which needs the GPU.
GPU_BACKENDS = ("tvm-cuda",)
BACKENDS = ("reference", "tvm-llvm", "hls4ml") + (GPU_BACKENDS if os.environ.get("QDEPLOY_GPU") == "1" else ())
assert set(BACKENDS) | set(GPU_BACKENDS) == set(TARGETS), \
    f"conformance suite does not cover every target: {sorted(TARGETS)}"


# ------------------------------------------------------------------------------ backends
@functools.lru_cache(maxsize=None)
def backend_problem(name: str) -> str | None:
    """None when ``get_backend(name)`` and its toolchain import; else why not."""
    try:
        get_backend(name)
        if name == "hls4ml":
            import hls4ml  # noqa: F401
        elif name in ("tvm-llvm", "tvm-cuda"):
            import tvm  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure is "not available"
        return f"{type(e).__name__}: {e}"
    return None


def backend_params(names=BACKENDS, slow=()):
    """pytest params for ``names``; an unimportable backend is xfail with the reason (never a
    silent skip); names in ``slow`` also get the ``slow`` marker."""
    out = []
    for n in names:
        marks = []
        why = backend_problem(n)
        if why:
            marks.append(pytest.mark.xfail(reason=f"backend {n!r} cannot be loaded yet ({why})", strict=False))
        if n in slow:
            marks.append(pytest.mark.slow)
        out.append(pytest.param(n, id=n, marks=marks))
    return out


@dataclasses.dataclass
class Compiled:
    backend: str
    graph: object
    out_dir: Path
    info: dict
    fn: Callable
    seconds: float

    def __call__(self, feeds):
        return self.fn(feeds)


def compile_graph(backend: str, graph, out_dir, config=None) -> Compiled:
    """emit -> build -> load ``graph`` for ``backend`` into ``out_dir`` (created, must be empty).

    Raises whatever the backend raises (UnsupportedError naming the node for what it cannot do).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    be = get_backend(backend)
    mcpu = os.environ.get("QDEPLOY_CONFORMANCE_TVM_MCPU")
    if backend == "tvm-llvm" and mcpu:
        # run the suite on one CPU level's code (e.g. x86-64-v4, the library a default artifact
        # loads on an AVX-512 machine) instead of the portable x86-64 library the suite builds
        config = dict(config or {})
        config["tvm"] = {**dict(config.get("tvm") or {}), "mcpu": mcpu}
    t0 = time.perf_counter()
    info = be.emit(graph, dict(config or {}), out_dir)
    json.dumps(info, default=str)  # manifest-able (contract)
    be.build(out_dir, info)
    fn = be.load(out_dir, info, graph)
    return Compiled(backend, graph, out_dir, info, fn, time.perf_counter() - t0)


def emit_only(backend: str, graph, config=None):
    """Just ``emit`` into a throw-away directory: the cheap way to learn whether (and at which
    node) a backend rejects a graph.  Returns the exception or None."""
    with tempfile.TemporaryDirectory(prefix="qd_emit_") as d:
        try:
            get_backend(backend).emit(graph, dict(config or {}), Path(d))
        except UnsupportedError as e:
            return e
    return None


class CompileCache:
    """Session cache: one build per (backend, graph digest, config)."""

    def __init__(self, factory):
        self.factory = factory
        self.cache: dict = {}

    def get(self, backend: str, graph, config=None) -> Compiled:
        key = (backend, graph.digest(), json.dumps(config or {}, sort_keys=True))
        if key not in self.cache:
            d = self.factory.mktemp(f"{backend}_{graph.name}"[:40])
            try:
                self.cache[key] = compile_graph(backend, graph, d, config)
            except Exception as e:  # noqa: BLE001 - remembered and re-raised for every user
                self.cache[key] = e
        res = self.cache[key]
        if isinstance(res, Exception):
            raise res
        return res


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    return CompileCache(tmp_path_factory)


# ------------------------------------------------------------------------------ feeds
def grid_reals(rng, shape, e_lo=-14, e_hi=12, mant_bits=7) -> np.ndarray:
    """float32 reals m * 2**e, |m| < 2**mant_bits, e uniform in [e_lo, e_hi]: exact in float32
    and hitting every rounding tie / overflow of any type of <= 16 bits somewhere."""
    m = rng.integers(-(1 << mant_bits), 1 << mant_bits, shape)
    e = rng.integers(e_lo, e_hi + 1, shape)
    return np.ldexp(m.astype(np.float64), e - mant_bits).astype(np.float32)


def random_codes(rng, t: FixedType, shape) -> np.ndarray:
    """Codes over the full range of ``t``, with the extremes forced in."""
    c = rng.integers(t.min_code, t.max_code + 1, shape, dtype=np.int64)
    flat = c.reshape(-1)
    if flat.size >= 4:
        flat[:2] = [t.min_code, t.max_code]
    return c


def random_feeds(graph, rng, batch=8, float_fn=None) -> dict[str, np.ndarray]:
    """Runtime arrays for every graph input: codes for fixed inputs, grid reals for float ones."""
    feeds = {}
    for name in graph.inputs:
        v = graph.values[name]
        shape = (batch, *v.shape)
        if isinstance(v.dtype, FixedType):
            feeds[name] = random_codes(rng, v.dtype, shape)
        else:
            feeds[name] = (float_fn or grid_reals)(rng, shape)
    return feeds


# ------------------------------------------------------------------------------ comparison
LEDGER: list[dict] = []


def _widths(graph, outputs):
    ws = set()
    for o in outputs:
        t = graph.values[o].dtype
        if isinstance(t, FixedType):
            ws.add(t.width)
    return ws


_DIGESTS: dict = {}


def _digest(graph) -> str:
    if id(graph) not in _DIGESTS:
        _DIGESTS[id(graph)] = (graph, graph.digest())
    return _DIGESTS[id(graph)][1]


def compare(suite: str, model: str, backend: str, graph, got: dict, want: dict | None = None,
            outputs=None, feeds=None, widths=None) -> list[str]:
    """Compare ``got`` with the reference (``want``, or computed from ``feeds``) on ``outputs``
    (default: all graph outputs).  Fixed-point outputs: ``np.array_equal`` on int64 codes; float
    outputs: float32 within 1e-5 (TVM computes float parts in its own order).  Records the result
    in the ledger and returns the list of mismatch descriptions (empty when exact)."""
    if want is None:
        want = ref.execute(graph, feeds, codes=True)
    outputs = list(graph.outputs if outputs is None else outputs)
    bad, n_vals, n_bad = [], 0, 0
    for o in outputs:
        t = graph.values[o].dtype
        g, w = np.asarray(got[o]), np.asarray(want[o])
        if g.shape != w.shape:
            bad.append(f"{o}: shape {g.shape} != reference {w.shape}")
            n_bad += w.size
            continue
        n_vals += w.size
        if isinstance(t, FixedType):
            if g.dtype != np.int64:
                bad.append(f"{o}: runtime dtype {g.dtype}, contract says int64 codes")
            diff = g != w
            k = int(diff.sum())
            if k:
                i = tuple(int(x) for x in np.argwhere(diff)[0])
                bad.append(f"{o} ({t}): {k}/{w.size} codes differ, first at {i}: got {g[i]} want {w[i]}")
                n_bad += k
        else:
            if g.dtype != np.float32:
                bad.append(f"{o}: runtime dtype {g.dtype}, contract says float32")
            close = np.isclose(g, w, rtol=1e-5, atol=1e-5) | (np.isnan(g) & np.isnan(w))
            k = int((~close).sum())
            if k:
                bad.append(f"{o} (float32): {k}/{w.size} values differ, max abs err {np.nanmax(np.abs(g - w))}")
                n_bad += k
    LEDGER.append({"suite": suite, "model": model, "backend": backend, "build": _digest(graph),
                   "outputs": len(outputs),
                   "values": n_vals, "mismatches": n_bad,
                   "widths": sorted(widths if widths is not None else _widths(graph, outputs))})
    return bad


def assert_exact(*args, **kw):
    bad = compare(*args, **kw)
    assert not bad, "not bit-exact with the reference:\n  " + "\n  ".join(bad[:20])


def check_code_ranges(graph, values: dict):
    """Every fixed-point runtime array holds codes of its type (reference invariant)."""
    for name, arr in values.items():
        t = graph.values[name].dtype
        if isinstance(t, FixedType):
            assert arr.dtype == np.int64, name
            if arr.size:
                assert t.min_code <= arr.min() and arr.max() <= t.max_code, \
                    f"{name}: codes [{arr.min()}, {arr.max()}] outside {t} [{t.min_code}, {t.max_code}]"
        else:
            assert isinstance(t, FloatType) and arr.dtype == np.float32, name


def pytest_terminal_summary(terminalreporter):
    if not LEDGER:
        return
    tr = terminalreporter
    tr.section("conformance ledger (comparisons against the reference interpreter)")
    rows: dict = {}
    for r in LEDGER:
        k = (r["suite"], r["backend"])
        a = rows.setdefault(k, {"models": set(), "builds": set(), "cmp": 0, "values": 0, "mismatches": 0,
                                "widths": set()})
        a["models"].add(r["model"])
        a["builds"].add(r["build"])
        a["cmp"] += 1
        a["values"] += r["values"]
        a["mismatches"] += r["mismatches"]
        a["widths"].update(r["widths"])
    tr.write_line("models: tiny models / type branches compared; builds: distinct compiled graphs")
    tr.write_line(f"{'suite':<12}{'backend':<11}{'models':>8}{'builds':>8}{'compares':>10}{'values':>12}"
                  f"{'widths':>8}{'mismatch':>10}")
    tot = {"models": set(), "builds": set(), "values": 0, "mismatches": 0, "cmp": 0}
    for (suite, be), a in sorted(rows.items()):
        tr.write_line(f"{suite:<12}{be:<11}{len(a['models']):>8}{len(a['builds']):>8}{a['cmp']:>10}"
                      f"{a['values']:>12}{len(a['widths']):>8}{a['mismatches']:>10}")
        tot["models"].update((suite, m) for m in a["models"])
        tot["builds"].update((be, d) for d in a["builds"])
        for k in ("values", "mismatches", "cmp"):
            tot[k] += a[k]
    bes = sorted({r["backend"] for r in LEDGER})
    widths = sorted({w for r in LEDGER for w in r["widths"]})
    tr.write_line(f"total: {len(tot['models'])} distinct models x {len(bes)} backends ({', '.join(bes)}), "
                  f"{len(tot['builds'])} builds, bit widths {widths[0]}..{widths[-1]} ({len(widths)}), "
                  f"{tot['cmp']} comparisons, {tot['values']} values, mismatches {tot['mismatches']}")
    path = os.environ.get("QDEPLOY_CONFORMANCE_LEDGER")
    if path:
        Path(path).write_text(json.dumps(LEDGER, indent=0))


# ------------------------------------------------------------------------------ wide models
@dataclasses.dataclass
class Case:
    """A tiny model: ``build(b, p, rng)`` adds inputs/nodes whose names start with ``p`` to
    GraphBuilder ``b`` and returns its output value names.  ``rejects``: backends expected to
    raise UnsupportedError for it (anything else must compile and be exact)."""

    id: str
    op: str
    build: Callable
    rejects: tuple = ()

    def __post_init__(self):
        # tvm-cuda lowers through tvm-llvm's table (backends/tvm/ops.py): same rejections
        if "tvm-llvm" in self.rejects and "tvm-cuda" not in self.rejects:
            self.rejects = tuple(self.rejects) + ("tvm-cuda",)

    def graph(self, seed=0):
        b = GraphBuilder(self.id)
        outs = self.build(b, f"{self.id}__", np.random.default_rng([seed, _stable(self.id)]))
        b.output(*outs)
        return b.build()


def merge_cases(name: str, cases, seed=0):
    """One graph holding every case side by side (disjoint inputs, all outputs).
    Returns (graph, {case id: [output names]})."""
    b = GraphBuilder(name)
    outs = {}
    for c in cases:
        o = c.build(b, f"{c.id}__", np.random.default_rng([seed, _stable(c.id)]))
        outs[c.id] = list(o)
        b.output(*o)
    return b.build(), outs


def _stable(s: str) -> int:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little")


class Wide:
    """Per backend: which cases it rejects (UnsupportedError from a cheap per-case emit), and
    one compiled wide graph of the accepted ones, built lazily and reused by every test."""

    def __init__(self, name: str, cases, compiled: CompileCache, seed=0, config=None):
        self.name, self.cases, self.compiled, self.seed, self.config = name, list(cases), compiled, seed, config
        self._res: dict = {}

    def get(self, backend: str):
        """-> (rejected {case id: UnsupportedError}, Compiled, {case id: outputs}).

        Compiles the merged graph of all cases; when the backend rejects it, the case owning the
        node named by the UnsupportedError is set aside and the rest retried (emit fails fast,
        before any build)."""
        if backend not in self._res:
            rejected, ok = {}, list(self.cases)
            while True:
                g, outs = merge_cases(f"{self.name}_{backend}".replace("-", "_"), ok, self.seed)
                try:
                    comp = self.compiled.get(backend, g, self.config)
                    break
                except UnsupportedError as e:
                    owner = [c for c in ok if e.node and e.node.startswith(f"{c.id}__")]
                    if not owner:
                        raise
                    rejected[owner[0].id] = e
                    ok.remove(owner[0])
            self._res[backend] = (rejected, comp, outs)
        return self._res[backend]


# ------------------------------------------------------------------------------ xdist groups
def pytest_collection_modifyitems(config, items):
    """With ``pytest -n N --dist loadgroup`` (the night run of the slow grid), every bit-width test
    of one model and backend goes to one worker, so each wide model (a TVM build of an 800-node
    graph costs minutes) is built once instead of once per worker; every other test is grouped by
    its file (as ``--dist loadfile``: module fixtures are built once).  Other distributions (the
    default ``--dist loadfile``) ignore the mark."""
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        cs = getattr(item, "callspec", None)
        mod = getattr(item, "module", None)
        model_of = getattr(mod, "MODEL_OF", {})
        tname = cs.params.get("tname") if cs is not None else None
        backend = cs.params.get("backend") if cs is not None else None
        if tname in model_of and backend is not None:
            group = f"{model_of[tname]}-{backend}"
        else:
            group = item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
