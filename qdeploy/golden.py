"""Golden-output record and check: the CI workflow for deployed models.

``record`` stores inputs and the reference interpreter's outputs (integer codes and real
values), the IR digest, the source model hash and the library versions in one ``.npz``.
``check`` runs a compiled artifact on the stored inputs and compares: zero tolerance on
fixed-point outputs (code for code) unless the user sets one.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .compiler.errors import QDeployError
from .compiler.ir.graph import Graph
from .compiler.ir.types import FixedType
from .compiler.reference import execute


class GoldenError(QDeployError):
    """Unreadable or inconsistent golden file."""


def _sha(path) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return ""


def record(model_or_out, out_file, inputs=None, config=None, samples: int = 64, seed: int = 0,
           layout=None) -> dict:
    """Record a golden file.

    Args:
        model_or_out: an artifact directory (its IR and, without ``inputs``, its stored golden
            inputs are used) or a model (path / ``module:function`` / Graph), which is imported
            and optimized with the default passes exactly as ``qdeploy compile`` does.
        out_file: ``.npz`` to write.
        inputs: real inputs, batch first, in the source model's layout (array or dict);
            default: the artifact's golden inputs or ``samples`` random ones.
        layout: layout of ``inputs``: None/``"source"`` (the layout the artifact's manifest
            declares, or the imported model's), ``"channels-last"``, or the letters of either.
            Never inferred from the shapes.
    Returns:
        summary dict (samples, outputs, graph digest).
    Raises:
        QDeployError: a bad ``layout`` or an input shape that does not match it; an artifact
            that declares no layout.
    """
    from .api import golden_feeds, load, load_config
    from .runtime.artifact import MANIFEST, read_manifest, versions
    from .passes import PassManager, default_pipeline
    from .runtime.compiled import user_feeds
    from .runtime.layout import declared_layouts

    p = Path(str(model_or_out))
    source_hash = ""
    if p.is_dir() and (p / MANIFEST).is_file():
        graph = Graph.load(str(p / "ir" / "model"))
        if inputs is None:
            with np.load(p / "golden.npz") as z:
                feeds_ir = {k[3:]: z[k] for k in z.files if k.startswith("in:")}
            feeds = {k: graph.value(k).dtype.quantize_real(v) if isinstance(graph.value(k).dtype, FixedType)
                     else v.astype(np.float32) for k, v in feeds_ir.items()}
        else:
            man = read_manifest(p)
            feeds = user_feeds(graph, inputs, layout, declared_layouts(man, graph, str(p))[0])
        source_hash = read_manifest(p).get("graph_digest", "")
    else:
        cfg = load_config(config)
        cfg.setdefault("golden", {"samples": samples, "seed": seed})
        graph = load(model_or_out if not isinstance(model_or_out, Path) else str(model_or_out))
        calib = golden_feeds(graph, inputs, cfg, layout)
        graph = PassManager(default_pipeline(cfg.get("input_type"), calib)).run(graph)
        from .compiler.reference import prepare_feeds
        feeds = prepare_feeds(graph, {k: v for k, v in calib.items() if k in graph.inputs})
        if p.is_file():
            source_hash = _sha(p)
    outs = execute(graph, feeds, codes=True)
    arrays = {}
    for k, v in feeds.items():
        arrays[f"input_codes:{k}"] = v
    for k, v in outs.items():
        t = graph.value(k).dtype
        arrays[f"output_codes:{k}"] = v
        arrays[f"output_real:{k}"] = t.to_real(v) if isinstance(t, FixedType) else v
    meta = {"graph_digest": graph.digest(), "source_hash": source_hash, "versions": versions(),
            "inputs": {k: str(graph.value(k).dtype) for k in feeds},
            "outputs": {k: str(graph.value(k).dtype) for k in outs}}
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    np.savez(out_file, **arrays)
    n = next(iter(feeds.values())).shape[0]
    return {"samples": int(n), "outputs": list(outs), "graph_digest": meta["graph_digest"]}


@dataclass
class CheckResult:
    """Outcome of :func:`check`.  ``first`` describes the first mismatch (or is None)."""

    samples: int
    mismatches: int
    max_abs_error: float
    first: dict | None
    digest_matches: bool

    @property
    def ok(self) -> bool:
        return self.mismatches == 0


def load_golden(path) -> tuple[dict, dict]:
    """(meta, arrays) of a golden file.

    Raises:
        GoldenError: not a qdeploy golden file.
    """
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise GoldenError(f"cannot read golden file {path}: {type(e).__name__}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise GoldenError(f"{path} is not a qdeploy golden file (a .npz from `qdeploy golden record`)")
    with data as z:
        arrays = {k: z[k] for k in z.files}
    if "__meta__" not in arrays:
        if arrays and all(k.startswith(("in:", "ref:")) for k in arrays):
            raise GoldenError(f"{path} is an artifact's own golden.npz (the inputs and reference outputs its compile "
                              f"was checked on, see its report.md), not a golden file: make one with "
                              f"`qdeploy golden record <artifact> -o golden.npz`")
        raise GoldenError(f"{path} is not a qdeploy golden file (no __meta__ record)")
    meta = json.loads(arrays.pop("__meta__").tobytes().decode())
    return meta, arrays


def check(out_dir, golden_file, tolerance: float = 0.0) -> CheckResult:
    """Run the artifact at ``out_dir`` on the golden inputs and compare its outputs.

    Fixed-point outputs are compared as integer codes (``tolerance`` in real units, default
    0: bit-exact); float outputs by absolute difference against ``tolerance``; the recorded real
    values (``output_real:*``) are compared with the artifact's real outputs as well, and a
    recorded output type other than the artifact's is refused.

    Raises:
        GoldenError: golden file unreadable or its inputs/outputs (names, types, shapes) do not
            match the artifact.
    """
    from .runtime import CompiledModel

    meta, arrays = load_golden(golden_file)
    m = CompiledModel.load(out_dir)
    g = m.graph
    feeds = {k.split(":", 1)[1]: v for k, v in arrays.items() if k.startswith("input_codes:")}
    if set(feeds) != set(g.inputs):
        raise GoldenError(f"golden inputs {sorted(feeds)} do not match the artifact's inputs {list(g.inputs)}")
    for k, v in feeds.items():
        if meta["inputs"].get(k) != str(g.value(k).dtype):
            raise GoldenError(f"input {k!r}: golden type {meta['inputs'].get(k)} != artifact type {g.value(k).dtype}", k)
    other_model = meta.get("graph_digest") not in (None, g.digest())
    for k, v in feeds.items():
        if tuple(np.shape(v)[1:]) != tuple(g.value(k).shape):
            raise GoldenError(f"input {k!r}: golden codes of shape {np.shape(v)} (IR layout), the artifact takes "
                              f"(N, {', '.join(map(str, g.value(k).shape))})"
                              + ("; the golden file was recorded from another model (its graph digest differs "
                                 "from the artifact's)" if other_model else ""))
    got = m.run_codes(feeds)
    mism = np.zeros(next(iter(feeds.values())).shape[0], dtype=bool)
    max_err = 0.0
    first = None
    for o in g.outputs:
        key = f"output_codes:{o}"
        if key not in arrays:
            raise GoldenError(f"golden file has no output {o!r}", o)
        want, have = arrays[key], np.asarray(got[o])
        t = g.value(o).dtype
        if want.shape != have.shape:
            raise GoldenError(f"output {o!r}: golden shape {want.shape} != artifact {have.shape}", o)
        recorded_t = (meta.get("outputs") or {}).get(o)
        if recorded_t is not None and recorded_t != str(t):
            # the same codes at another binary point are other values: a changed output type is a mismatch
            raise GoldenError(f"output {o!r}: golden type {recorded_t} != artifact type {t} (the recorded codes "
                              f"mean other real values here)", o)
        if isinstance(t, FixedType):
            err = np.abs(t.to_real(want) - t.to_real(have))
            wr, hr = t.to_real(want), t.to_real(have)
        else:
            err = np.abs(want.astype(np.float64) - have.astype(np.float64))
            wr, hr = want, have
        real_key = f"output_real:{o}"
        if real_key in arrays and arrays[real_key].shape == have.shape:
            # the recorded real values are what the user checks against: compared as well (they equal
            # the recorded codes' values unless the file was edited)
            rr = np.asarray(arrays[real_key], dtype=np.float64)
            err = np.maximum(err, np.abs(rr - np.asarray(hr, dtype=np.float64)))
            wr = rr
        bad = err > tolerance
        max_err = max(max_err, float(err.max(initial=0.0)))
        mism |= bad.reshape(bad.shape[0], -1).any(axis=1)
        if first is None and bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            first = {"sample": idx[0], "output": o, "index": list(idx[1:]), "expected": float(wr[idx]),
                     "actual": float(hr[idx]),
                     "expected_code": int(want[idx]) if isinstance(t, FixedType) else None,
                     "actual_code": int(have[idx]) if isinstance(t, FixedType) else None}
    return CheckResult(int(mism.size), int(mism.sum()), max_err, first,
                       meta.get("graph_digest") == g.digest())
