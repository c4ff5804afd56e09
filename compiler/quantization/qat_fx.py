"""Brevitas QAT models from a float ``nn.Module`` of any structure (residual adds, branches,
concatenation), by ``torch.fx`` symbolic tracing (https://pytorch.org/docs/stable/fx.html).

:func:`build_qat_graph_model` traces the float model into an ``fx.Graph`` and rewrites it:

* every BatchNorm right after a Linear/Conv whose output feeds nothing else is folded into it;
* every Linear / Conv1d / Conv2d becomes a Brevitas ``QuantLinear`` / ``QuantConv1d`` /
  ``QuantConv2d`` **under the same module name** (the allocation key), with its weight bits
  (:func:`.qat_layers.weight_kwargs`: power-of-two per-tensor weights, ``Int16Bias``, ``Int32Bias`` above 16 weight + input bits);
* the model input gets a constant power-of-two quantizer (module ``input_quant``);
* every ReLU (``nn.ReLU`` module, ``F.relu``, ``torch.relu``, ``x.relu()``) becomes a ``QuantReLU``
  (a module ReLU keeps its name; a functional one becomes module ``<node>_quant``) whose bits are
  the input-activation bits of the weight layers it feeds (through shape-only ops: pooling,
  flatten, view/reshape, dropout, identity), or ``default_act_bits`` when it feeds none;
* a weight layer whose input is not such a quantized tensor (e.g. it reads the output of an add
  or a concatenation directly) gets a signed/unsigned ``QuantIdentity`` (module ``<node>_quant``,
  sign from the calibration data, else signed) inserted on that input;
* operands of every other op (add, concatenation, multiplication, ...) are unwrapped to plain
  tensors first: the residual add runs on the exact values of its operands (a weight layer's
  output is its wide accumulator, an activation its quantized value) and the next quantizer
  requantizes the sum, as in HAWQ-V3's integer-only residual block (Yao et al., arXiv 2011.10680,
  Sec. 3.3 and Fig. 2: "the residual addition is performed in INT32 precision" and the block
  input is quantized once for all layers that read it).

Constraints this puts on a bit allocation, returned by :func:`required_ties` (the search adds them
to the recipe's ties, :func:`.search.check_ties`):

* weight layers reading one quantized tensor share its quantizer, hence its bits (HAWQ-V3 Fig. 2,
  transition block: "we only quantize the input once ... for both 1x1 convolutions");
* weight layers whose outputs meet at an add (through shape-only ops), e.g. the last conv of a
  residual branch and the 1x1 projection of its shortcut, share their bit widths so both addends
  have the same weight precision (the residual constraint of ``ilp.py``'s ties).

Ties tie both the weight and the (searched) activation bits of the layers (:func:`.ilp.allocate`).
"""
from __future__ import annotations

import copy
import operator
from typing import Mapping

import numpy as np
import torch
from torch import fx, nn

from ..errors import QDeployError, UnsupportedError
from .qat_layers import act_quantizer, fold_bn_into, input_quantizer, quant_weight_layer

__all__ = ["trace", "input_layers", "required_ties", "merge_ties", "build_qat_graph_model", "plain"]

WEIGHT_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d)
# modules that keep a quantized tensor on its grid (Brevitas passes QuantTensors through them)
PASS_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Flatten,
                nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
PASS_FUNCTIONS = (torch.flatten, torch.reshape, nn.functional.max_pool1d, nn.functional.max_pool2d,
                  nn.functional.adaptive_max_pool1d, nn.functional.adaptive_max_pool2d,
                  nn.functional.dropout)
PASS_METHODS = ("flatten", "view", "reshape", "contiguous")
RELU_FUNCTIONS = (nn.functional.relu, torch.relu)
ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
# modules kept as they are (float modules Brevitas leaves alone in eval and export)
KEEP_MODULES = PASS_MODULES + (nn.AvgPool1d, nn.AvgPool2d)


def plain(x):
    """``x.value`` for a Brevitas ``QuantTensor``, else ``x`` (inserted before non-quantizer ops)."""
    return getattr(x, "value", x)


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` of ``model``; QDeployError naming the reason when the model cannot
    be traced (data-dependent control flow, for instance)."""
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, RuntimeError... for untraceable code
        raise UnsupportedError(f"the model cannot be traced by torch.fx ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}); QAT needs a static graph") from None


def _mods(gm):
    return dict(gm.named_modules())


def _is_weight(n, mods) -> bool:
    return n.op == "call_module" and isinstance(mods[n.target], WEIGHT_MODULES)


def _is_pass(n, mods) -> bool:
    if n.op == "call_module":
        return isinstance(mods[n.target], PASS_MODULES)
    if n.op == "call_function":
        return n.target in PASS_FUNCTIONS
    if n.op == "call_method":
        return n.target in PASS_METHODS
    return False


def _is_relu(n, mods) -> bool:
    if n.op == "call_module":
        return type(mods[n.target]) is nn.ReLU
    if n.op == "call_function":
        return n.target in RELU_FUNCTIONS
    return n.op == "call_method" and n.target == "relu"


def _is_add(n) -> bool:
    return (n.op == "call_function" and n.target in ADD_FUNCTIONS) or (n.op == "call_method" and n.target == "add")


def _source(n, mods):
    """The node a value comes from, walking back through shape-only ops (their first argument)."""
    while _is_pass(n, mods):
        n = n.args[0]
    return n


def _weight_consumers(n, mods) -> list[str]:
    """Weight layers reading ``n``'s value (directly or through shape-only ops), in graph order."""
    out, todo, seen = [], list(n.users), set()
    while todo:
        u = todo.pop(0)
        if u in seen:
            continue
        seen.add(u)
        if _is_weight(u, mods):
            out.append(u.target)
        elif _is_pass(u, mods):
            todo.extend(u.users)
    return list(dict.fromkeys(out))


def _check(gm) -> None:
    mods = _mods(gm)
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(ph) != 1:
        raise UnsupportedError(f"QAT takes a model with one input, this one has {len(ph)}")
    used: dict = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            used[n.target] = used.get(n.target, 0) + 1
            m = mods[n.target]
            if not isinstance(m, WEIGHT_MODULES + BN_MODULES + KEEP_MODULES) and type(m) is not nn.ReLU:
                raise UnsupportedError(f"{type(m).__name__} is not supported by the QAT builder", node=n.target)
            if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.padding_mode != "zeros":
                raise UnsupportedError(f"padding_mode {m.padding_mode!r} is not supported (only zeros)", node=n.target)
        elif n.op == "get_attr":
            raise UnsupportedError("the model reads a parameter or buffer outside a supported layer",
                                   node=str(n.target))
    again = sorted(t for t, c in used.items() if c > 1)
    if again:
        raise UnsupportedError(f"module(s) {again} run more than once per forward (weight sharing): "
                               "give each call its own module", node=again[0])


def _fold_bns(gm) -> None:
    mods = _mods(gm)
    for n in list(gm.graph.nodes):
        if n.op != "call_module" or not isinstance(mods[n.target], BN_MODULES):
            continue
        p = n.args[0]
        if not (isinstance(p, fx.Node) and _is_weight(p, mods) and len(p.users) == 1):
            raise UnsupportedError("batch-norm not directly after a Linear/Conv (whose output feeds nothing "
                                   "else) cannot be folded", node=n.target)
        gm.add_submodule(p.target, fold_bn_into(mods[p.target], mods[n.target]))
        n.replace_all_uses_with(p)
        gm.graph.erase_node(n)
    gm.delete_all_unused_submodules()


def _folded(model: nn.Module) -> fx.GraphModule:
    was = model.training
    model.eval()  # BN folding uses running statistics; fx bakes self.training into F.dropout calls
    try:
        gm = trace(model)
    finally:
        model.train(was)
    gm = fx.GraphModule(copy.deepcopy(gm), gm.graph)  # deep copy: folding must not touch the caller's model
    _check(gm)
    _fold_bns(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def input_layers(model: nn.Module) -> list[str]:
    """Names of the weight layers that read the model input (through shape-only ops), i.e. whose
    input activation is the fixed input format, not a searched width.  Raises QDeployError when
    the model cannot be traced or holds an unsupported module."""
    gm = _folded(model)
    mods = _mods(gm)
    (ph,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return _weight_consumers(ph, mods)


def required_ties(model: nn.Module) -> list[list[str]]:
    """Tie groups the QAT model of a non-``nn.Sequential`` model imposes (module docstring): weight
    layers sharing one input quantizer, and weight layers whose outputs meet at an add, merged
    where they overlap.  ``[]`` for a chain.  Raises QDeployError like :func:`input_layers`."""
    gm = _folded(model)
    mods = _mods(gm)
    groups: list[list[str]] = []
    inputs = set(input_layers(model))
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            continue
        # one quantizer per tensor: the weight layers reading it share its bits
        if not _is_pass(n, mods):
            g = [c for c in _weight_consumers(n, mods) if c not in inputs]
            if len(g) > 1:
                groups.append(g)
        if _is_add(n):
            g = []
            for a in n.args:
                if isinstance(a, fx.Node):
                    s = _source(a, mods)
                    if _is_weight(s, mods):
                        g.append(s.target)
            if len(g) > 1:
                groups.append(g)
    return merge_ties(groups)


def merge_ties(groups) -> list[list[str]]:
    """Union of overlapping tie groups (lists of layer names), each in first-appearance order."""
    out: list[list[str]] = []
    for g in groups:
        g = list(dict.fromkeys(g))
        hit = [o for o in out if set(o) & set(g)]
        for o in hit:
            out.remove(o)
        merged = list(dict.fromkeys([x for o in hit for x in o] + g))
        out.append(merged)
    return out


@torch.no_grad()
def _node_values(gm, x) -> dict:
    """Every node's value (eval mode) on calibration input ``x``: ``{node name: tensor}``."""
    vals: dict = {}

    class Rec(fx.Interpreter):
        def run_node(self, n):
            r = super().run_node(n)
            if isinstance(r, torch.Tensor):
                vals[n.name] = r.detach()
            return r

    gm.eval()
    Rec(gm).run(torch.as_tensor(np.asarray(x, dtype=np.float32)))
    return vals


def build_qat_graph_model(float_model: nn.Module, bits: Mapping[str, tuple], input_bits: int = 8,
                          input_scale: float = 2.0 ** -4, input_signed: bool = False,
                          default_act_bits: int = 8, calibration_x=None) -> fx.GraphModule:
    """Brevitas ``fx.GraphModule`` with per-layer bits from a float model of any structure.

    Args:
        float_model: a ``torch.fx``-traceable module with one input, built of Linear / Conv1d /
            Conv2d, ReLU (module or functional), BatchNorm1d/2d right after a Linear/Conv, max/avg
            pooling, Flatten, Dropout, Identity, and tensor ops (add, cat, view, ...); not modified.
        bits: {weight layer name (``named_modules``): (w_bits, a_bits)}; a_bits of a layer that reads
            the model input is ignored (the input quantizer sets it).
        input_bits, input_scale, input_signed: the model input's fixed-point format.
        default_act_bits: bits of a ReLU that feeds no weight layer.
        calibration_x: optional inputs (N, ...): each activation quantizer's scale starts at the
            least-squares power-of-two scale of the float model's values there
            (:func:`.qat_layers.act_quantizer`).

    Returns:
        The rewritten ``fx.GraphModule`` (module docstring), in eval mode; the weight layers keep
        their names.

    Raises:
        UnsupportedError: untraceable model, unsupported module, shared module, unfoldable BN
            (names the module).
        QDeployError: a weight layer missing from ``bits``, or weight layers that read one quantized
            tensor with different activation bits (tie them: :func:`required_ties`).
    """
    from brevitas.nn import QuantIdentity, QuantReLU

    gm = _folded(float_model)
    mods = _mods(gm)
    wnodes = [n for n in gm.graph.nodes if _is_weight(n, mods)]
    for n in wnodes:
        if n.target not in bits:
            raise QDeployError(f"no bit widths given for layer {n.target!r}")
    for name in ("input_quant",):
        if name in mods:
            raise UnsupportedError(f"the model already has a module named {name!r}, which the QAT builder adds",
                                   node=name)
    vals = _node_values(gm, calibration_x) if calibration_x is not None else {}
    (ph,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = set(_weight_consumers(ph, mods))

    def act_bits(node, what):
        consumers = [c for c in _weight_consumers(node, mods) if c not in inputs]
        got = {c: int(bits[c][1]) for c in consumers}
        if len(set(got.values())) > 1:
            raise QDeployError(f"layers {', '.join(f'{c} ({b} bits)' for c, b in got.items())} read the same "
                               f"{what} {node.name!r} with different activation bits; tie them "
                               f"(qat_fx.required_ties)", node=consumers[0])
        return next(iter(got.values())) if got else int(default_act_bits)

    def new_name(base):
        name, k = f"{base}_quant", 1
        while name in mods:
            name, k = f"{base}_quant{k}", k + 1
        mods[name] = None
        return name

    g = gm.graph
    quantized = {ph}  # nodes whose value is a Brevitas QuantTensor at run time
    # 1. the input quantizer
    mods["input_quant"] = None
    gm.add_submodule("input_quant", QuantIdentity(act_quant=input_quantizer(input_bits, input_scale, input_signed),
                                                  return_quant_tensor=True))
    with g.inserting_after(ph):
        iq = g.call_module("input_quant", (ph,))
    ph.replace_all_uses_with(iq, delete_user_cb=lambda u: u is not iq)
    quantized = {iq}
    # 2. walk in graph order: ReLUs -> QuantReLU, weight layers -> Quant layers, other ops unwrap
    for n in list(g.nodes):
        if n.op in ("placeholder", "output") or n is iq:
            continue
        if _is_relu(n, mods):
            ab = act_bits(n, "activation")
            cal = vals.get(n.name)
            q = QuantReLU(act_quant=act_quantizer(ab, False, cal), bit_width=ab, return_quant_tensor=True)
            if n.op == "call_module":
                gm.add_submodule(n.target, q)
                quantized.add(n)
            else:
                name = new_name(n.name)
                gm.add_submodule(name, q)
                with g.inserting_after(n):
                    m = g.call_module(name, (n.args[0],))
                n.replace_all_uses_with(m)
                g.erase_node(n)
                quantized.add(m)
            continue
        if _is_weight(n, mods):
            src = n.args[0]
            if _source(src, mods) not in quantized:
                # requantize a value that is not on a quantizer's grid (an add, a concatenation, ...)
                ab = act_bits(src, "tensor")
                cal = vals.get(src.name)
                signed = True if cal is None else bool(cal.min() < 0)
                name = new_name(src.name)
                gm.add_submodule(name, QuantIdentity(act_quant=act_quantizer(ab, signed, cal), bit_width=ab,
                                                     return_quant_tensor=True))
                with g.inserting_after(src):
                    qn = g.call_module(name, (src,))
                for u in list(src.users):
                    if u is not qn and _is_weight(u, mods):
                        u.replace_input_with(src, qn)
                quantized.add(qn)
            # input width: the layer's a_bits, or the model input's (not known here which layer reads it: the wider)
            gm.add_submodule(n.target, quant_weight_layer(mods[n.target], int(bits[n.target][0]),
                                                          max(int(bits[n.target][1]), int(input_bits))))
            continue
        if _is_pass(n, mods):
            if n.args[0] in quantized:
                quantized.add(n)
            continue
        # any other op: plain tensors in (Brevitas QuantTensor arithmetic would change the metadata)
        for a in list(n.all_input_nodes):
            if a in quantized or (_is_pass(a, mods) and _source(a, mods) in quantized):
                with g.inserting_before(n):
                    p = g.call_function(plain, (a,))
                n.replace_input_with(a, p)
    g.lint()
    gm.recompile()
    gm.eval()
    return gm
