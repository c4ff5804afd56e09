"""What a user hands to :func:`qdeploy.compile` besides the model: the config (a mapping or a YAML
file, :func:`load_config` / :func:`check_config`), the golden inputs (given arrays or a ``.npz``
file, else seeded random ones: :func:`golden_feeds`) and input arrays read from ``.npy``/``.npz``
files (:func:`load_array_file`).  Re-exported by :mod:`qdeploy.api`."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .compiler.errors import QDeployError
from .compiler.ir.graph import Graph
from .compiler.ir.types import FixedType

__all__ = ["load_config", "check_config", "golden_feeds", "golden_arrays", "load_array_file"]


def load_config(config) -> dict:
    """A config dict from a dict, a YAML/JSON file path, or None.

    Keys (all optional): ``input_type`` (e.g. ``"fixed<16,6,RND_CONV,SAT>"`` or ``"auto"``),
    ``golden`` (``{samples: 64, seed: 0}``), ``hls4ml`` (backend, part, clock_period [ns],
    io_type, strategy, reuse_factor), ``tvm`` (target, mcpu, mtriple, arch, ...: see
    :mod:`qdeploy.backends.tvm.target`).

    Raises:
        QDeployError: unreadable file or not a mapping.
    """
    if config is None:
        return {}
    if isinstance(config, dict):
        return check_config(dict(config), "config")
    p = Path(config)
    import yaml
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise QDeployError(f"cannot read config {p}: {type(e).__name__}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise QDeployError(f"config {p} must be a mapping of options")
    return check_config(data, f"config {p}")


CONFIG_KEYS = {"input_type", "golden", "hls4ml", "tvm", "asic", "estimate", "memory_budget"}


def check_config(cfg: dict, where: str) -> dict:
    """Validate a config up front: known top-level keys only (a misspelt key is an error, not
    silently ignored), ``golden.samples`` >= 1 and integer ``golden.seed``, and an ``input_type``
    that is ``auto`` or a parsable type (even when no input needs it).

    Raises:
        QDeployError: naming the config and the offending key.
    """
    unknown = sorted(set(cfg) - CONFIG_KEYS)
    if unknown:
        raise QDeployError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known keys: "
                           f"{', '.join(sorted(CONFIG_KEYS))}")
    gold = cfg.get("golden")
    if gold is not None:
        if not isinstance(gold, dict):
            raise QDeployError(f"{where}: 'golden' must be a mapping like {{samples: 64, seed: 0}}")
        for key, lo in (("samples", 1), ("seed", 0)):
            if key in gold:
                v = gold[key]
                if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                    raise QDeployError(f"{where}: golden.{key} must be an integer >= {lo}, got {v!r}")
    t = cfg.get("input_type")
    if t is not None and t != "auto":
        from .compiler.ir.types import parse_type
        try:
            parse_type(str(t))
        except ValueError as e:
            raise QDeployError(f"{where}: bad input_type {t!r}: {e}; expected e.g. fixed<16,6,RND_CONV,SAT> or auto") from None
    return cfg


def golden_feeds(graph: Graph, golden, cfg: dict, layout=None) -> dict[str, np.ndarray]:
    """Golden inputs of ``graph`` as real-valued arrays in IR layout, keyed by input name.

    Args:
        graph: the imported model (its inputs name and type the feeds).
        golden: user inputs (an array, a list in input order, a dict by input name, or a
            ``.npy``/``.npz`` path; batch first, the source model's layout), or None for
            ``cfg["golden"]["samples"]`` (default 64) random inputs drawn with ``cfg["golden"]["seed"]``
            (default 0): uniform codes over a fixed-point input's range, uniform [-1, 1) floats otherwise.
        cfg: the checked config (:func:`load_config`).
        layout: the layout of user inputs: None/``"source"`` (``graph.meta['input_perms']``),
            ``"channels-last"`` or the letters of either (never inferred from the shapes).
    Returns:
        ``{input name: array (n, *IR shape)}``.
    Raises:
        QDeployError: an unreadable or ill-formed golden file, a bad ``layout``, or a shape that
            does not match (stated in the user's layout).
    """
    from .runtime.layout import channels_last_mode, graph_layouts, to_ir

    if golden is not None:
        ins, _ = graph_layouts(graph)
        cl = channels_last_mode(layout, ins)
        return {k: to_ir(k, v, graph.value(k).shape, ins[k], cl) if k in ins else np.asarray(v)
                for k, v in golden_arrays(graph, golden).items()}
    g = cfg.get("golden", {}) or {}
    n, seed = int(g.get("samples", 64)), int(g.get("seed", 0))
    rng = np.random.default_rng(seed)
    feeds = {}
    for v in graph.input_values():
        if isinstance(v.dtype, FixedType):
            codes = rng.integers(v.dtype.min_code, v.dtype.max_code + 1, size=(n, *v.shape))
            feeds[v.name] = v.dtype.to_real(codes)
        else:
            feeds[v.name] = rng.uniform(-1, 1, size=(n, *v.shape)).astype(np.float32)
    return feeds


def golden_arrays(graph: Graph, golden) -> dict[str, np.ndarray]:
    """User golden inputs (an array, a list in input order, a dict by input name, or a
    ``.npy``/``.npz`` path) as ``{input name: array}``, unchanged (batch first, the user's layout).

    Raises:
        QDeployError: an unreadable or ill-formed golden file.
    """
    if isinstance(golden, (str, os.PathLike)):
        golden = load_array_file(golden, graph.inputs)
    if not isinstance(golden, dict):
        golden = dict(zip(graph.inputs, golden if isinstance(golden, (list, tuple)) else [golden]))
    return {k: np.asarray(v) for k, v in golden.items()}


def load_array_file(path, names=()) -> "np.ndarray | dict":
    """Read a ``.npy`` array or a ``.npz`` archive (arrays named after the inputs, or one array).

    Raises:
        QDeployError: missing file or not a NumPy array file (pickles are never loaded).
    """
    p = Path(path)
    if not p.is_file():
        raise QDeployError(f"input file {p} not found")
    try:
        data = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise QDeployError(f"{p} is not a NumPy .npy/.npz array file ({type(e).__name__})") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        with data as z:
            named = {k: z[k] for k in z.files if k in names}
            if named:
                return named
            if len(z.files) == 1:
                return z[z.files[0]]
            raise QDeployError(f"{p} holds arrays {z.files}; name them after the model inputs {list(names)}")
    return data
