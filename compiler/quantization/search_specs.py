"""Layers and sensitivities of the mixed-precision search (:mod:`.search`): one
:class:`~.ilp.LayerSpec` per weight layer (:func:`layer_specs`), the per-layer sensitivity of each
(weight bits, activation bits) option (:func:`compute_sensitivities`: HAWQ-V3 Omega, the measured
loss increase, or their maximum) and the checked tie groups (:func:`check_ties`).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import QDeployError
from . import hessian, ilp, qat_fx, sensitivity
from .qat_layers import is_chain

__all__ = ["DEFAULT_BITS", "SENSITIVITY_MODES", "layer_specs", "compute_sensitivities", "check_ties"]

DEFAULT_BITS = tuple(range(2, 9))


# --------------------------------------------------------------------------- specs / sensitivities


@torch.no_grad()
def layer_specs(model: nn.Module, example_input, w_bits=DEFAULT_BITS, a_bits=DEFAULT_BITS,
                input_bits: int = 8, fixed_act_bits: int = 8) -> list[ilp.LayerSpec]:
    """One :class:`~.ilp.LayerSpec` per weight layer, shapes measured on ``example_input`` (batch first).

    The layers that read the model input (an ``nn.Sequential``'s first layer; for any other module
    those :func:`.qat_fx.input_layers` finds) have their input fixed at ``input_bits``; every other
    layer's input activation is searched over ``a_bits`` (``a_bits=()`` keeps every activation at
    ``fixed_act_bits``, default 8: a weights-only search with one uniform activation width).

    Raises:
        QDeployError: bad bit lists, or a non-Sequential model ``torch.fx`` cannot trace.
    """
    w_bits = tuple(sensitivity.check_bits(w_bits))
    a_bits = tuple(sensitivity.check_bits(a_bits)) if a_bits else ()
    shapes = {}
    hooks = []
    for n, m in hessian.weight_layers(model):
        hooks.append(m.register_forward_hook(lambda mod, a, o, n=n: shapes.__setitem__(n, (a[0].shape, o.shape))))
    was = model.training
    model.eval()
    try:
        model(torch.as_tensor(np.asarray(example_input, dtype=np.float32))[:1])
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    wl = hessian.weight_layers(model)
    first = {wl[0][0]} if is_chain(model) and wl else set(qat_fx.input_layers(model))
    specs = []
    for n, m in wl:
        _, oshape = shapes[n]
        if isinstance(m, nn.Linear):
            n_in, n_out, pos, kind = m.in_features, m.out_features, int(np.prod(oshape[1:-1])) or 1, "dense"
        else:
            n_in = int(np.prod(m.kernel_size)) * m.in_channels // m.groups
            n_out, pos, kind = m.out_channels, int(np.prod(oshape[2:])), "conv"
        specs.append(ilp.LayerSpec(name=n, n_in=int(n_in), n_out=int(n_out), positions=int(pos),
                                   n_weights=int(m.weight.numel()), w_bits=w_bits,
                                   a_bits=a_bits if n not in first else (),
                                   fixed_a_bits=int(input_bits) if n in first else int(fixed_act_bits),
                                   kind=kind))
    return specs


SENSITIVITY_MODES = ("hessian", "hessian+measured", "measured")


def compute_sensitivities(model, specs, traces: hessian.TraceResult, x, y=None, mode: str = "hessian",
                          details: dict | None = None) -> dict:
    """{layer: {(w_bits, a_bits): Omega_w(w_bits) + Omega_a(a_bits)}} per tensor.

    Modes:
        ``"hessian"``: HAWQ-V3 Eq. 10, Omega = Tr(H)/n * ||Q_b(T) - T||^2 (arXiv 2011.10680);
        ``"hessian+measured"``: max(Omega, 2 Delta L) with Delta L the measured loss increase of
        quantizing that tensor alone (:func:`.sensitivity.measured_loss_increase`; needs ``y``):
        the Hessian estimate except where the measurement shows the quadratic model under-estimates;
        ``"measured"``: 2 Delta L only (an ablation; no Hessian).
    ``details`` (optional dict) receives per layer ``{"omega_w", "measured_w", "omega_a", "measured_a"}``.

    Raises:
        QDeployError: unknown mode, or a measured mode without labels ``y``.
    """
    if mode not in SENSITIVITY_MODES:
        raise QDeployError(f"sensitivity mode {mode!r}: expected one of {', '.join(SENSITIVITY_MODES)}")
    if mode != "hessian" and y is None:
        raise QDeployError(f"sensitivity mode {mode!r} needs the labels of the trace data")
    mods = dict(model.named_modules())
    acts = hessian.layer_inputs(model, x, [s.name for s in specs if s.a_bits])
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    yt = None if y is None else torch.as_tensor(np.asarray(y)).long()

    def combine(om, name, bits, what):
        if mode == "hessian":
            return om, None
        ml = sensitivity.measured_loss_increase(model, xt, yt, name, bits, what=what)
        if mode == "measured":
            return {b: max(2.0 * ml[b], 0.0) for b in om}, ml
        return {b: max(om[b], 2.0 * ml[b]) for b in om}, ml

    out = {}
    for s in specs:
        w = mods[s.name].weight.detach()
        om_w = sensitivity.weight_sensitivity(traces.weights[s.name].mean, w, s.w_bits)
        ow, mw = combine(om_w, s.name, s.w_bits, "weight")
        d = {"omega_w": om_w, "measured_w": mw}
        if s.a_bits:
            om_a = sensitivity.act_sensitivity(traces.activations[s.name].mean, acts[s.name], s.a_bits)
            oa, ma = combine(om_a, s.name, s.a_bits, "act")
            d.update(omega_a=om_a, measured_a=ma)
        else:
            oa = {s.fixed_a_bits: 0.0}
        if details is not None:
            details[s.name] = d
        out[s.name] = {(wb, ab): ow[wb] + oa[ab] for wb, ab in s.options()}
    return out


def check_ties(model, ties) -> list[list[str]]:
    """The tie groups as lists, checked: every name is a weight layer (Linear/Conv) of ``model``.

    For a model that is not an ``nn.Sequential`` the ties its QAT model imposes
    (:func:`.qat_fx.required_ties`: layers sharing an input quantizer, layers joined by an add) are
    merged in, so every allocation the ILP returns can be built.

    Raises:
        QDeployError: a name that is not a module of the model, or a module without weights.
    """
    mods = dict(model.named_modules())
    for g in ties or ():
        for n in g:
            if n not in mods:
                raise QDeployError(f"tie names {n!r}, which is not a module of the model")
            if not isinstance(mods[n], hessian.WEIGHT_TYPES):
                raise QDeployError(f"tie names layer {n!r} ({type(mods[n]).__name__}), which has no weights")
    out = [list(g) for g in ties or ()]
    if not is_chain(model):
        out = qat_fx.merge_ties(out + qat_fx.required_ties(model))
    return out
