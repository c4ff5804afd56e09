"""Recipes of the mixed-precision search: loading one and checking what it returns.

A *recipe* is a callable (or ``"module:function"``, ``"path/file.py:function"``, or a YAML file
with ``recipe: <one of those>`` and optional ``args:``, keyword arguments for it) returning a
dict whose keys are listed in :mod:`.search` (``model``, ``train``, ``val``, optional ``test``,
``input``, ``name``, ``qat``, ``ties``, ``trace_samples``).  Every check raises a one-line
:class:`~qdeploy.compiler.errors.QDeployError` naming the key at fault.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from torch import nn

from ..errors import QDeployError

__all__ = ["RECIPE_KEYS", "QAT_KEYS", "load_recipe", "check_recipe_result", "recipe_xy", "check_qat_settings"]

RECIPE_KEYS = ("model", "train", "val", "test", "input", "name", "qat", "ties", "trace_samples")
QAT_KEYS = ("epochs", "lr", "batch_size", "distill_alpha", "distill_temperature")


def load_recipe(spec) -> tuple[Callable, dict]:
    """``(recipe_callable, keyword_arguments)`` from a callable, ``module:function``, ``file.py:function``
    or a YAML file (``recipe: module:function`` plus an optional ``args:`` mapping of keyword
    arguments for that function).  Raises QDeployError when it cannot be loaded."""
    if callable(spec):
        return spec, {}
    spec = str(spec)
    p = Path(spec)
    if p.suffix in (".yaml", ".yml"):
        import yaml
        if not p.is_file():
            raise QDeployError(f"recipe file {p} not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise QDeployError(f"recipe file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict) or "recipe" not in data:
            raise QDeployError(f"recipe file {p} must be a mapping with a 'recipe: module:function' key")
        extra = sorted(set(data) - {"recipe", "args"})
        if extra:
            raise QDeployError(f"recipe file {p}: unknown key(s) {extra}; it takes 'recipe' and 'args' (keyword "
                               "arguments of the recipe function); search settings are command-line options")
        args = data.get("args") or {}
        if not isinstance(args, dict):
            raise QDeployError(f"recipe file {p}: 'args' must be a mapping of keyword arguments")
        inner = str(data["recipe"])
        if Path(inner.rsplit(":", 1)[0] if ":" in inner else inner).suffix in (".yaml", ".yml"):
            raise QDeployError(f"recipe file {p}: 'recipe' must be module:function or path.py:function, "
                               f"not another YAML file ({inner})")
        fn, _ = load_recipe(inner)
        return fn, args
    if ":" not in spec:
        raise QDeployError(f"recipe {spec!r}: expected module:function, path.py:function or a YAML file")
    mod, fn = spec.rsplit(":", 1)
    try:
        if mod.endswith(".py") or os.sep in mod:
            mp = Path(mod)
            s = importlib.util.spec_from_file_location(f"_qdeploy_recipe_{mp.stem}", mp)
            if not mp.is_file():
                raise QDeployError(f"recipe file {mp} not found" + (" (it is a folder)" if mp.is_dir() else ""))
            if s is None:
                raise FileNotFoundError(mod)
            m = importlib.util.module_from_spec(s)
            sys.modules[s.name] = m
            s.loader.exec_module(m)
        else:
            m = importlib.import_module(mod)
        f = getattr(m, fn)
    except AttributeError:
        raise QDeployError(f"cannot load recipe {spec!r}: {mod} has no function {fn!r}") from None
    except (ImportError, FileNotFoundError) as e:
        raise QDeployError(f"cannot load recipe {spec!r}: {type(e).__name__}: {e}") from None
    if not callable(f):
        raise QDeployError(f"recipe {spec!r} is a {type(f).__name__}, not a function")
    return f, {}


def check_recipe_result(r) -> None:
    """One-line QDeployError for a recipe result that is not the documented dict."""
    if not isinstance(r, Mapping):
        raise QDeployError(f"the recipe returned {type(r).__name__}, expected a dict with model, train, val "
                           "(optional test, input, name, qat, ties, trace_samples)")
    for k in ("model", "train", "val"):
        if k not in r:
            raise QDeployError(f"recipe result lacks {k!r} (needs model, train, val; optional test, input)")
    unknown = sorted(set(r) - set(RECIPE_KEYS))
    if unknown:
        raise QDeployError(f"recipe result has unknown key(s) {unknown}; known: {', '.join(RECIPE_KEYS)}")
    if not isinstance(r["model"], nn.Module):
        raise QDeployError(f"recipe 'model' is a {type(r['model']).__name__}, expected a torch nn.Module")
    for k in ("qat", "input"):
        if r.get(k) is not None and not isinstance(r[k], Mapping):
            raise QDeployError(f"recipe {k!r} must be a mapping, got {type(r[k]).__name__}")


def recipe_xy(r, key: str):
    """``(x, y)`` arrays of recipe field ``key``, checked: a pair, same length, integer labels."""
    v = r[key]
    if not isinstance(v, (tuple, list)) or len(v) != 2:
        raise QDeployError(f"recipe {key!r} must be a pair (x, y), got {type(v).__name__}")
    x, y = np.asarray(v[0]), np.asarray(v[1])
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise QDeployError(f"recipe {key!r}: x must be (N, ...) and y (N,) with the same N > 0, got x "
                           f"{tuple(x.shape)} and y {tuple(y.shape)}")
    if not np.issubdtype(y.dtype, np.integer):
        raise QDeployError(f"recipe {key!r}: labels y must be integers, got {y.dtype}")
    return x, y


def check_qat_settings(q: Mapping) -> dict:
    """The recipe's QAT settings with types and ranges checked (one-line QDeployError naming the key)."""
    unknown = sorted(set(q) - set(QAT_KEYS))
    if unknown:
        raise QDeployError(f"recipe 'qat' has unknown key(s) {unknown}; known: {', '.join(QAT_KEYS)}")
    out = dict(q)
    for k, typ in (("epochs", int), ("batch_size", int), ("lr", float), ("distill_alpha", float),
                   ("distill_temperature", float)):
        if k not in out:
            continue
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or \
                (typ is int and float(v) != int(v)) or not math.isfinite(float(v)):
            raise QDeployError(f"recipe 'qat': {k} must be {'an integer' if typ is int else 'a number'}, got {v!r}")
        out[k] = typ(v)
    if out["epochs"] < 0:
        raise QDeployError(f"qat epochs must be >= 0, got {out['epochs']}")
    if out["batch_size"] < 1:
        raise QDeployError(f"recipe 'qat': batch_size must be >= 1, got {out['batch_size']}")
    if not out["lr"] > 0:
        raise QDeployError(f"recipe 'qat': lr must be > 0, got {out['lr']}")
    da, dt = out.get("distill_alpha", 0.0), out.get("distill_temperature", 2.0)
    if not (0.0 <= da <= 1.0 and dt > 0.0):
        raise QDeployError(f"recipe 'qat': distill_alpha must be in [0, 1] and distill_temperature > 0, got "
                           f"{da} and {dt}")
    return out
