"""Quantize into every bit width 1..16 (unsigned; signed from 2 bits), every rounding x
saturation mode (``SAT_SYM`` signed only), through Dense / Relu / Quantize chains, on every
backend -- both the graph-input cast (float -> fixed) and fixed -> fixed casts.

Each type is one parallel branch of a wide model with two shared inputs (a float32 one and a
wide ``fixed<44,22>`` one) fed with power-of-two-grid reals at scales from 2**-22 to 2**19, so
that every type sees exact ties, rounding, overflow and in-range values.  Per branch ``T``::

    a  = Quantize(xc -> T)                           fixed -> fixed cast
    xq = Quantize(xf -> T)                           float -> fixed cast (host side on hls4ml)
    dq = Quantize(Dense(a) -> T)                     accumulator -> T
    rq = Quantize(Relu(Dense(a)) -> T)               fused relu+cast on hls4ml
    eq = Quantize(Dense(xq) + bias -> T)

The default run compiles ONE model (a sampled grid that still covers every width x signedness
and every rounding x saturation pair); ``-m slow`` adds the rest of the full grid, one model
per rounding mode.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from qdeploy.compiler import reference as ref
from qdeploy.compiler.ir import Const, GraphBuilder, parse_type
from qdeploy.compiler.ir.types import FLOAT32, ROUNDING_MODES, SATURATION_MODES, FixedType

from .conftest import backend_params, check_code_ranges, compare, grid_reals, random_codes

N_IN, N_OUT, BATCH = 8, 2, 32
XC_TYPE = parse_type("fixed<44,22>")


def _int_bits(w: int, k: int) -> int:
    """Varied binary-point positions: negative, zero, inside, at and beyond the width."""
    return [-2, 0, 1, w // 2, w - 1, w, w + 2][k % 7]


def _mode_pairs(signed: bool):
    return [(r, s) for r in ROUNDING_MODES for s in SATURATION_MODES if signed or s != "SAT_SYM"]


def all_types() -> list[FixedType]:
    out = []
    for signed in (False, True):
        for w in range(2 if signed else 1, 17):
            for k, (r, s) in enumerate(_mode_pairs(signed)):
                out.append(FixedType(w, _int_bits(w, k + w), signed, r, s))
    return out


def fast_types() -> list[FixedType]:
    """A sample of :func:`all_types`: every (width, signedness) once, with the 28 rounding x
    saturation pairs dealt over them (SAT_SYM ones to signed types) so every pair occurs."""
    full = {(t.width, t.signed, t.rounding, t.saturation): t for t in all_types()}
    slots = [(w, False) for w in range(1, 17)] + [(w, True) for w in range(2, 17)]
    sym = [(r, s) for r, s in _mode_pairs(True) if s == "SAT_SYM"]
    other = [(r, s) for r, s in _mode_pairs(True) if s != "SAT_SYM"]
    signed_slots = [x for x in slots if x[1]]
    unsigned_slots = [x for x in slots if not x[1]]
    # signed slots: the 7 SAT_SYM pairs first, then the rest; unsigned slots: the rest, cycled
    pairs_s = sym + other[len(unsigned_slots):]
    pairs_u = other[:len(unsigned_slots)]
    pairs_s += other[: len(signed_slots) - len(pairs_s)]
    out = [full[(w, sg, *rs)] for (w, sg), rs in zip(unsigned_slots, pairs_u)]
    out += [full[(w, sg, *rs)] for (w, sg), rs in zip(signed_slots, pairs_s)]
    return out


def tag(t: FixedType) -> str:
    return f"{'s' if t.signed else 'u'}{t.width}_{t.int_bits}_{t.rounding}_{t.saturation}".replace("-", "m")


ALL = all_types()
FAST = fast_types()
_fast_tags = {tag(t) for t in FAST}
SLOW = [t for t in ALL if tag(t) not in _fast_tags]
MODELS = {"bw_fast": FAST}
MODELS.update({f"bw_{r}": [t for t in SLOW if t.rounding == r] for r in ROUNDING_MODES})
MODEL_OF = {tag(t): m for m, ts in MODELS.items() for t in ts}
TYPE_OF = {tag(t): t for t in ALL}


def build_model(name: str, types) -> tuple:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    b = GraphBuilder(name)
    xf = b.input("xf", (N_IN,), FLOAT32)
    xc = b.input("xc", (N_IN,), XC_TYPE)
    wt, bt = parse_type("fixed<3,1>"), parse_type("fixed<5,2>")
    branches = {}
    for t in types:
        p = tag(t) + "__"
        a = b.add(p + "a", "Quantize", [xc], attrs={"to": t})
        xq = b.add(p + "xq", "Quantize", [xf], attrs={"to": t})
        d = b.add(p + "d", "Dense", [a], params={"weight": Const(random_codes(rng, wt, (N_IN, N_OUT)), wt)})
        dq = b.add(p + "dq", "Quantize", [d], attrs={"to": t})
        r = b.add(p + "r", "Relu", [d])
        rq = b.add(p + "rq", "Quantize", [r], attrs={"to": t})
        e = b.add(p + "e", "Dense", [xq], params={"weight": Const(random_codes(rng, wt, (N_IN, N_OUT)), wt),
                                                  "bias": Const(random_codes(rng, bt, (N_OUT,)), bt)})
        eq = b.add(p + "eq", "Quantize", [e], attrs={"to": t})
        branches[tag(t)] = [a, xq, dq, rq, eq]
        b.output(a, xq, dq, rq, eq)
    return b.build(), branches


def model_feeds(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    xf = grid_reals(rng, (BATCH, N_IN), e_lo=-16, e_hi=19, mant_bits=6)
    xf[0, :8] = [0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.25, -0.75]  # ties at integer / coarse grids
    xc = grid_reals(rng, (BATCH, N_IN), e_lo=-16, e_hi=19, mant_bits=6).astype(np.float64)
    xc[0, :8] = [0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.25, -0.75]
    return {"xf": xf, "xc": XC_TYPE.quantize_real(xc)}


_RUNS: dict = {}


@pytest.fixture(scope="module")
def bw_run(compiled):
    def get(model: str, backend: str):
        key = (model, backend)
        if key not in _RUNS:
            g, branches = build_model(model, MODELS[model])
            comp = compiled.get(backend, g)
            feeds = model_feeds(11)
            want = ref.execute(g, feeds, codes=True)
            _RUNS[key] = (g, branches, comp(feeds), want)
        return _RUNS[key]
    return get


def _check(tname, backend, bw_run):
    model = MODEL_OF[tname]
    g, branches, got, want = bw_run(model, backend)
    t = TYPE_OF[tname]
    assert all(g.values[o].dtype == t for o in branches[tname] if not o.endswith(("__d", "__e")))
    bad = compare("bitwidths", tname, backend, g, got, want, outputs=branches[tname], widths={t.width})
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("tname", [tag(t) for t in FAST])
def test_bitwidth_fast(tname, backend, bw_run):
    _check(tname, backend, bw_run)


@pytest.mark.slow
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("tname", [tag(t) for t in SLOW])
def test_bitwidth_full(tname, backend, bw_run):
    _check(tname, backend, bw_run)


# ------------------------------------------------------------------------------ the grid itself
def test_grid_coverage():
    assert len(ALL) == 16 * 7 * 3 + 15 * 7 * 4 == 756
    assert len({tag(t) for t in ALL}) == len(ALL)
    for ts in (ALL, FAST):
        assert {(t.width, t.signed) for t in ts} == {(w, s) for s in (False, True) for w in range(2 if s else 1, 17)}
        assert {(t.rounding, t.saturation) for t in ts} == set(_mode_pairs(True))
    assert {tag(t) for t in FAST} <= {tag(t) for t in ALL}


@pytest.mark.parametrize("model", [pytest.param(m, marks=[pytest.mark.slow] if m != "bw_fast" else [])
                                   for m in MODELS])
def test_feeds_exercise_every_type(model):
    """On the reference, every type's casts really round and overflow somewhere (the feeds
    are not trivially inside or outside every range)."""
    g, branches = build_model(model, MODELS[model])
    feeds = model_feeds(11)
    out = ref.execute(g, feeds, codes=True, keep=True)
    check_code_ranges(g, out)
    xc_real = XC_TYPE.to_real(feeds["xc"])
    for tname, (a, xq, dq, rq, eq) in branches.items():
        t = TYPE_OF[tname]
        want_distinct = min(3, 1 << t.width)
        assert len(np.unique(out[a])) >= want_distinct, tname
        got = t.to_real(out[a])
        assert (got != xc_real).any(), f"{tname}: no value changed by the cast"
        inside = (xc_real >= t.min_value) & (xc_real <= t.max_value)
        assert (~inside).any(), f"{tname}: no overflow exercised"
        assert (got[inside] != xc_real[inside]).any(), f"{tname}: no rounding exercised"
