"""Property-based conformance: hypothesis draws small random quantized DAGs (chains with
branches of Dense / Conv / Relu / Quantize / Add / Concat / Max- and AvgPool / GlobalAvgPool /
Reshape, random fixed-point types of 1..16 bits with random rounding and overflow modes) and
checks

* reference invariants: the graph verifies and survives a JSON round trip, every runtime value
  holds codes inside its type's range, the ``reference`` backend equals ``execute``;
* ``tvm-llvm`` == reference, bit for bit (default run, ~30 examples);
* ``hls4ml`` == reference (``-m slow`` only, a few examples: each costs a C++ build), or an
  UnsupportedError that names a node of the graph.
"""
from __future__ import annotations

import faulthandler
import multiprocessing
import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qdeploy.compiler import reference as ref
from qdeploy.compiler.errors import UnsupportedError
from qdeploy.compiler.ir import Const, Graph, GraphBuilder, parse_type
from qdeploy.compiler.ir.types import FLOAT32, ROUNDING_MODES, SATURATION_MODES, FixedType
from qdeploy.compiler.ir.verify import verify

from .conftest import backend_problem, check_code_ranges, compare, compile_graph, random_codes, random_feeds

MAX_CHAIN_WIDTH = 28  # wider values are re-quantized before further arithmetic


@st.composite
def fixed_types(draw, max_width=16):
    signed = draw(st.booleans())
    w = draw(st.integers(2 if signed else 1, max_width))
    i = draw(st.integers(-2, w + 2))
    r = draw(st.sampled_from(ROUNDING_MODES))
    s = draw(st.sampled_from([m for m in SATURATION_MODES if signed or m != "SAT_SYM"]))
    return FixedType(w, i, signed, r, s)


OP_CHOICES = ("Quantize", "Relu", "Dense", "Conv", "MaxPool", "AvgPool", "GlobalAvgPool", "Add", "Concat",
              "Reshape")


@st.composite
def random_graphs(draw):
    """A random small quantized DAG; every graph output is fixed-point and computed by a node."""
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    rank = draw(st.sampled_from([1, 2, 3]))
    if rank == 1:
        shape = (draw(st.integers(1, 12)),)
    elif rank == 2:
        shape = (draw(st.integers(2, 10)), draw(st.integers(1, 4)))
    else:
        shape = (draw(st.integers(2, 6)), draw(st.integers(2, 6)), draw(st.integers(1, 4)))
    b = GraphBuilder("prop")
    in_float = draw(st.booleans())
    x = b.input("x", shape, FLOAT32 if in_float else draw(fixed_types(12)))
    pool = [b.add("q_in", "Quantize", [x], attrs={"to": draw(fixed_types())})] if in_float else [x]
    made = []
    n_ops = draw(st.integers(1, 6))

    def val(name):
        return b.values[name]

    for k in range(n_ops):
        v = draw(st.sampled_from(pool))
        op = draw(st.sampled_from(OP_CHOICES))
        vv = val(v)
        sp = vv.shape[:-1]  # spatial dims (rank >= 2)
        if vv.dtype.width > MAX_CHAIN_WIDTH:
            op = "Quantize"
        if op in ("Conv", "MaxPool", "AvgPool", "GlobalAvgPool") and (len(vv.shape) < 2 or min(sp) < 2):
            op = "Relu"
        if op == "Reshape" and len(vv.shape) == 1:
            op = "Quantize"
        name = f"n{k}_{op.lower()}"
        if op == "Quantize":
            out = b.add(name, op, [v], attrs={"to": draw(fixed_types())})
        elif op == "Relu":
            out = b.add(name, op, [v])
        elif op == "Dense":
            wt = draw(fixed_types(6))
            n_out = draw(st.integers(1, 4))
            params = {"weight": Const(random_codes(rng, wt, (vv.shape[-1], n_out)), wt)}
            if draw(st.booleans()):
                bt = draw(fixed_types(8))
                params["bias"] = Const(random_codes(rng, bt, (n_out,)), bt)
            out = b.add(name, op, [v], params=params)
        elif op == "Conv":
            nd = len(sp)
            kern = tuple(draw(st.integers(1, min(3, d))) for d in sp)
            strides = tuple(draw(st.integers(1, 2)) for _ in sp)
            pads = tuple(draw(st.integers(0, kk - 1)) for kk in kern + kern)
            cin = vv.shape[-1]
            groups = draw(st.sampled_from([1, cin])) if cin > 1 else 1
            cout = groups * draw(st.integers(1, 2)) if groups > 1 else draw(st.integers(1, 4))
            wt = draw(fixed_types(5))
            params = {"weight": Const(random_codes(rng, wt, (*kern, cin // groups, cout)), wt)}
            if draw(st.booleans()):
                bt = draw(fixed_types(8))
                params["bias"] = Const(random_codes(rng, bt, (cout,)), bt)
            out = b.add(name, op, [v], attrs={"kernel": kern, "strides": strides, "pads": pads,
                                              "groups": groups}, params=params)
        elif op in ("MaxPool", "AvgPool"):
            kern = tuple(draw(st.integers(1, min(3, d))) for d in sp)
            strides = tuple(draw(st.integers(1, 2)) for _ in sp)
            if op == "MaxPool":
                pads = tuple(draw(st.integers(0, kk - 1)) for kk in kern + kern)
            else:
                pads = (0,) * (2 * len(sp))
            out = b.add(name, op, [v], attrs={"kernel": kern, "strides": strides, "pads": pads})
        elif op == "GlobalAvgPool":
            out = b.add(name, op, [v])
        elif op == "Add":
            same = [p for p in pool if val(p).shape == vv.shape and val(p).dtype.width <= MAX_CHAIN_WIDTH]
            out = b.add(name, op, [v, draw(st.sampled_from(same))])
        elif op == "Concat":
            ok = [p for p in pool if val(p).shape[:-1] == vv.shape[:-1] and len(val(p).shape) == len(vv.shape)]
            out = b.add(name, op, [v, draw(st.sampled_from(ok))], attrs={"axis": -1})
        else:  # Reshape: flatten
            out = b.add(name, op, [v], attrs={"shape": (vv.size,)})
        pool.append(out)
        made.append(out)
    outs = [made[-1]] + [m for m in made[:-1] if draw(st.booleans())]
    if in_float and draw(st.booleans()):
        outs.append(pool[0])  # the input cast itself (host side on hls4ml)
    b.output(*dict.fromkeys(outs))
    return b.build(), seed


def _feeds(g, seed, batch=4):
    return random_feeds(g, np.random.default_rng(seed), batch)


# ------------------------------------------------------------------------------ reference
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs())
def test_reference_invariants(gs):
    g, seed = gs
    verify(g)
    doc, arrays = g.to_json()
    g2 = Graph.from_json(doc, arrays)
    assert g2.digest() == g.digest()
    feeds = _feeds(g, seed)
    allv = ref.execute(g, feeds, codes=True, keep=True)
    check_code_ranges(g, {k: v for k, v in allv.items() if k in g.values})
    for o in g.outputs:
        assert isinstance(g.values[o].dtype, FixedType)
        assert allv[o].shape == (4, *g.values[o].shape)
    again = ref.execute(g2, feeds, codes=True)
    for o in g.outputs:
        assert np.array_equal(again[o], allv[o])


# ------------------------------------------------------------------------------ backends
def _compile_and_run(backend, g, seed, d):
    comp = compile_graph(backend, g, d)
    return comp(_feeds(g, seed))


def _isolated(backend, g, seed, d):
    """``_compile_and_run`` in a forked child, so that a crash inside native code (the hls4ml
    C simulation is plain C++ loaded with ctypes) fails this example instead of killing pytest.
    Returns outputs, or raises the child's UnsupportedError / an AssertionError describing the
    failure."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)

    def target():
        faulthandler.disable()  # a native abort is expected to be reported, not dumped
        try:
            res = ("ok", _compile_and_run(backend, g, seed, d))
        except UnsupportedError as e:
            res = ("unsupported", (e.reason, e.node))
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            res = ("error", f"{type(e).__name__}: {e}")
        child.send(res)
        child.close()
        os._exit(0)

    proc = ctx.Process(target=target)
    proc.start()
    child.close()
    try:
        res = parent.recv() if parent.poll(600) else None
    except EOFError:  # the child died without answering
        res = None
    proc.join(60)
    if res is None:
        g.save(os.path.join(d, "..", "crashed_graph"))
        raise AssertionError(f"{backend} crashed (exit code {proc.exitcode}) compiling/running:\n{g}")
    kind, payload = res
    if kind == "unsupported":
        raise UnsupportedError(*payload)
    if kind == "error":
        raise AssertionError(f"{backend} failed on a verified graph: {payload}\n{g}")
    return payload


def _backend_vs_reference(backend, g, seed, isolate=False):
    with tempfile.TemporaryDirectory(prefix=f"qd_prop_{backend}_") as d:
        try:
            if isolate:
                got = _isolated(backend, g, seed, os.path.join(d, "art"))
            else:
                got = _compile_and_run(backend, g, seed, d)
        except UnsupportedError as e:
            names = {n.name for n in g.nodes} | set(g.values) | {g.name}
            assert e.node in names, f"UnsupportedError names no node of the graph: {e}"
            return False
        feeds = _feeds(g, seed)
        bad = compare("property", f"prop_{g.digest()}", backend, g, got, feeds=feeds)
    assert not bad, "not bit-exact with the reference:\n  " + "\n  ".join(bad) + "\n" + str(g)
    return True


@pytest.mark.xfail(backend_problem("tvm-llvm") is not None, reason=f"tvm-llvm backend cannot be loaded: "
                   f"{backend_problem('tvm-llvm')}")
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs())
def test_tvm_equals_reference(gs):
    g, seed = gs
    assert _backend_vs_reference("tvm-llvm", g, seed), "TVM must compile every verified graph"


def _bug_reshape_output():
    b = GraphBuilder("bug_reshape")
    x = b.input("x", (2, 3), parse_type("fixed<8,3>"))
    f = b.add("flat", "Reshape", [x], attrs={"shape": (6,)})
    b.output(b.add("relu", "Relu", [f]), f)
    return b.build()


def _bug_round_beyond_msb():
    b = GraphBuilder("bug_round")
    x = b.input("x", (1,), parse_type("ufixed<1,0>"))
    b.output(b.add("q", "Quantize", [x], attrs={"to": parse_type("ufixed<1,2,RND,WRAP>")}))
    return b.build()


def test_hls4ml_rounding_cast_beyond_msb_is_exact():
    """Formerly crashed the C simulation (ap_private get_bit assertion): a rounding cast that drops
    at least all of its input's bits; the backend now sign-extends first."""
    if backend_problem("hls4ml"):
        pytest.xfail(backend_problem("hls4ml"))
    assert _backend_vs_reference("hls4ml", _bug_round_beyond_msb(), 0, isolate=True)


def test_hls4ml_reshape_of_input_as_output_is_rejected_naming_node():
    """Formerly a g++ 'redefinition of in_x' CompileError: hls4ml drops the Reshape of an input
    layer; the backend now refuses it up front with an UnsupportedError naming the Reshape."""
    if backend_problem("hls4ml"):
        pytest.xfail(backend_problem("hls4ml"))
    from qdeploy.backends import get_backend
    g = _bug_reshape_output()
    with tempfile.TemporaryDirectory() as d:
        with pytest.raises(UnsupportedError) as e:
            get_backend("hls4ml").emit(g, {}, d)
    assert e.value.node == "flat"


@pytest.mark.slow
@pytest.mark.xfail(backend_problem("hls4ml") is not None, reason=f"hls4ml backend cannot be loaded yet: "
                   f"{backend_problem('hls4ml')}")
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs())
def test_hls4ml_equals_reference(gs):
    g, seed = gs
    _backend_vs_reference("hls4ml", g, seed, isolate=True)
