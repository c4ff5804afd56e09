"""Checks that hls4ml built the design qdeploy asked for: every layer, class and precision kept
(:func:`check_model`), and the reuse factor qdeploy computed on every Dense/Conv layer
(:func:`check_reuse_factors`).  hls4ml's optimizers may insert, drop, rename or retype layers
(hls4ml docs: "Optimizer passes"); a change that could alter a value fails the compile."""
from __future__ import annotations

from ...compiler.errors import CompileError
from .translate import Translation

__all__ = ["check_model", "check_reuse_factors"]

#: Layers hls4ml may drop on its own without changing any value (identical-type linear cast,
#: no-op reshape in io_parallel, final reshape, unit BatchNormalization).
_DROPPABLE = ("Reshape", "Activation", "BatchNormalization")
#: Layers hls4ml may insert on its own (exact: data movement only).
_INSERTABLE = ("ZeroPadding1D", "ZeroPadding2D", "Clone", "Repack", "Broadcast")


def check_reuse_factors(model, tr: Translation, rfs: dict) -> None:
    """hls4ml must build every Dense/Conv layer with the reuse factor qdeploy computed
    (:func:`.settings.closest_reuse_factor`); a layer it changed means the two legalizations
    disagree, and the estimate would describe another design.

    Raises:
        CompileError: naming the node, both values.
    """
    layers = {lay.name: lay for lay in model.get_layers()}
    for node, r in rfs.items():
        for name in tr.node_layers.get(node, []):
            lay = layers.get(name)
            if lay is None or lay.get_attr("reuse_factor") is None:
                continue
            if int(lay.get_attr("reuse_factor")) != r["used"]:
                raise CompileError(f"hls4ml built layer {name!r} with reuse factor {lay.get_attr('reuse_factor')}, "
                                   f"qdeploy computed {r['used']} (asked: {r['requested']}): the legalizations "
                                   f"disagree", node)


def check_model(model, tr: Translation) -> list[dict]:
    """Verify hls4ml kept our layers and types; returns a per-layer summary.

    Raises:
        CompileError: when hls4ml replaced a layer, changed a precision, or dropped a layer
            that is not a value-preserving no-op.
    """
    ours = {d["name"]: d for d in tr.layers}
    seen, summary = set(), []
    for lay in model.get_layers():
        name = lay.name
        types = {k: str(v.precision) for k, v in lay.types.items()}
        summary.append({"name": name, "class": lay.class_name, "types": types,
                        "reuse_factor": lay.get_attr("reuse_factor"), "strategy": lay.get_attr("strategy"),
                        **({"da_kernel_cost": float(lay.get_attr("da_kernel_cost"))}
                           if lay.get_attr("da_kernel_cost") is not None else {})})
        if name not in ours:
            if lay.class_name not in _INSERTABLE:
                raise CompileError(f"hls4ml inserted an unexpected layer {name!r} ({lay.class_name})")
            continue
        seen.add(name)
        want_cls = {"InputLayer": "Input"}.get(ours[name]["class_name"], ours[name]["class_name"])
        if _cls(lay.class_name) != _cls(want_cls) and lay.class_name != _hls4ml_class(want_cls):
            raise CompileError(f"hls4ml replaced layer {name!r} ({want_cls}) by {lay.class_name}")
        for var, want in tr.precisions[name].items():
            attr = f"{var}_t"
            t = lay.get_attr(attr)
            if t is None:
                continue
            got = str(t.precision)
            if _norm(got) != _norm(want) and not (var == "accum" and _max_pool(lay) and _holds(t.precision, want)):
                raise CompileError(f"hls4ml changed precision {var} of layer {name!r}: {want} -> {got}")
    for name, d in ours.items():
        if name not in seen and d["class_name"] not in _DROPPABLE + ("InputLayer",):
            raise CompileError(f"hls4ml dropped layer {name!r} ({d['class_name']})")
    return summary


def _max_pool(lay) -> bool:
    """A max-pooling layer (its accumulator only holds one of the input values)."""
    return "Pooling" in lay.class_name and str(lay.get_attr("pool_op", "")).lower() == "max"


def _holds(prec, want: str) -> bool:
    """hls4ml precision ``prec`` represents every value of our fixed type ``want``
    (``ap_[u]fixed<W,I,...>``): at least as many integer and fraction bits, and signed if ``want`` is.
    (Catapult's optimizers widen a max-pool accumulator; the maximum of exactly held values is the same.)"""
    import re
    m = re.match(r"\s*ap_(u?)fixed<\s*(\d+)\s*,\s*(-?\d+)", want)
    if m is None or not all(hasattr(prec, a) for a in ("width", "integer", "signed")):
        return False
    w_signed, w_width, w_int = m.group(1) != "u", int(m.group(2)), int(m.group(3))
    p_int_mag = prec.integer - (1 if prec.signed else 0)
    w_int_mag = w_int - (1 if w_signed else 0)
    return (prec.signed or not w_signed) and p_int_mag >= w_int_mag and \
        prec.width - prec.integer >= w_width - w_int


def _hls4ml_class(c: str) -> str | None:
    """Name of the Python class hls4ml instantiates for layer dict class ``c`` (its
    ``hls4ml.model.layers.layer_map``: e.g. ``LeakyReLU`` -> ``ParametrizedActivation``)."""
    from hls4ml.model.layers import layer_map
    cls = layer_map.get(c)
    return cls.__name__ if cls is not None else None


def _cls(c: str) -> str:
    """Layer class modulo hls4ml's renames (MaxPooling2D -> Pooling2D, Conv2D -> PointwiseConv2D...)."""
    for tok in ("Max", "Average", "Pointwise", "DepthwiseConv", "Merge"):
        c = c.replace(tok, "")
    return c


def _norm(t: str) -> str:
    """Canonical text of an ap_* / hls4ml precision string (hls4ml prints ``fixed<8,3,RND_CONV,SAT,0>``)."""
    from ...compiler.ir.types import parse_type

    t = t.replace(" ", "")
    parts = t[:-1].split(",")
    if len(parts) == 5 and parts[-1] == "0":  # saturation bits N=0
        t = ",".join(parts[:-1]) + ">"
    try:
        return str(parse_type(t))
    except ValueError:
        return t
