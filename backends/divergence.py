"""Divergence localization: when a target's outputs differ from the reference interpreter, name
the *first* layer (in the graph's topological order) whose outputs differ.

Each backend that can observe intermediate values offers ``localize(graph, config, out_dir, info,
feeds, ref_all) -> dict`` (hls4ml: a traced C-simulation build, hls4ml's ``ModelGraph.trace``;
TVM: a debug build whose outputs are every intermediate value); both hand their intermediate
values to :func:`first_divergence`, which compares them with the reference interpreter's
(``qdeploy.compiler.reference.execute(..., keep=True)``).  :func:`localize` is what
:func:`qdeploy.api.compile` calls, only when a target differs (the default path stays cheap).
"""
from __future__ import annotations

import numpy as np

from ..compiler.ir.graph import Graph
from ..compiler.ir.types import FixedType
from ..compiler.reference import execute


def first_divergence(graph: Graph, ref_all: dict, got: dict, layers: dict | None = None,
                     perms: dict | None = None) -> dict:
    """Compare intermediate values in topological order.

    Args:
        graph: the graph whose nodes are walked (topological order).
        ref_all: ``{value: (n, *shape) runtime array}`` from the reference (codes for fixed types).
        got: ``{value: (n, ...) array}`` the target's values *as real numbers* (any shape with
            ``n`` rows and ``value.size`` elements each, channels-last flat order).
        layers: ``{node: [target layer names]}`` to name the target's layers (optional).
        perms: ``{value: index array}``: the target holds value ``v`` with its flat elements
            reordered, ``got[v][:, k] == ref[v].flat[perms[v][k]]`` (an exact rewrite such as a
            transpose folded into the next layer's weights).
    Returns:
        ``{"first": None or {node, op, value, layers, samples (differing), of_samples, values
        (differing), of_values, max_abs_error, first_sample, first_index}, "compared": k,
        "not_observed": [values without a target counterpart]}``.
    """
    layers, perms = layers or {}, perms or {}
    compared, missing = 0, []
    for n in graph.nodes:
        for v in n.outputs:
            if v not in got:
                missing.append(v)
                continue
            t = graph.value(v).dtype
            r = np.asarray(ref_all[v])
            want = (t.to_real(r) if isinstance(t, FixedType) else r.astype(np.float64)).reshape(r.shape[0], -1)
            have = np.asarray(got[v], dtype=np.float64).reshape(r.shape[0], -1)
            if v in perms:
                want = want[:, np.asarray(perms[v])]
            compared += 1
            if have.shape != want.shape:
                return {"first": {"node": n.name, "op": n.op, "value": v, "layers": layers.get(n.name, []),
                                  "error": f"target holds {have.shape[1]} values per sample, reference "
                                           f"{want.shape[1]}"}, "compared": compared, "not_observed": missing}
            bad = want != have if isinstance(t, FixedType) else ~np.isclose(want, have, rtol=1e-5, atol=0)
            if bad.any():
                s, k = (int(i) for i in np.argwhere(bad)[0])
                return {"first": {"node": n.name, "op": n.op, "value": v, "layers": layers.get(n.name, []),
                                  "samples": int(bad.any(axis=1).sum()), "of_samples": int(bad.shape[0]),
                                  "values": int(bad.sum()), "of_values": int(bad.size),
                                  "max_abs_error": float(np.max(np.abs(want - have))),
                                  "first_sample": s, "first_index": k},
                        "compared": compared, "not_observed": missing}
    return {"first": None, "compared": compared, "not_observed": missing}


def divergence_sentence(div: dict) -> str:
    """One line about a :func:`localize` dict."""
    if div.get("error"):
        return f"divergence not localized: {div['error']}"
    f = div.get("first")
    if f is None:
        return (f"every one of the {div.get('compared', 0)} intermediate values observed in {div.get('how', 'the target')} "
                f"equals the reference ({len(div.get('not_observed', []))} not observable)")
    lay = f" (target layer{'s' if len(f['layers']) > 1 else ''} {', '.join(f['layers'])})" if f.get("layers") else ""
    if "error" in f:
        return f"first differing layer: node '{f['node']}' ({f['op']}){lay}: {f['error']}"
    return (f"first differing layer: node '{f['node']}' ({f['op']}){lay}, value '{f['value']}': {f['samples']} of "
            f"{f['of_samples']} samples, {f['values']} of {f['of_values']} values differ, max abs error "
            f"{f['max_abs_error']:.3g} (first: sample {f['first_sample']}, flat index {f['first_index']})")


def localize(backend, graph: Graph, config: dict, out_dir, info: dict, feeds: dict) -> dict:
    """The divergence dict for a target that differs from the reference.

    Args:
        backend: the backend object; without a ``localize`` method the dict says so.
        graph: the compiled graph; ``feeds``: its runtime input arrays (as passed to the target).
        config, out_dir, info: what ``emit``/``build`` got and returned.
    Returns:
        the backend's :func:`first_divergence` dict plus ``how`` (what was observed) and
        ``sentence`` (:func:`divergence_sentence`); or ``{"error": why, "sentence": ...}`` when the
        localization itself failed (never raises: the compile's own result stands).
    """
    if not hasattr(backend, "localize"):
        div = {"error": f"target {getattr(backend, 'name', backend)} cannot observe intermediate values"}
    else:
        try:
            ref_all = execute(graph, feeds, codes=True, keep=True)
            div = backend.localize(graph, config, out_dir, info, feeds, ref_all)
        except Exception as e:  # a failing debug build must not hide the mismatch itself
            div = {"error": " ".join(f"{type(e).__name__}: {e}".split())[:300]}
    div["sentence"] = divergence_sentence(div)
    return div
