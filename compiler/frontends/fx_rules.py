"""The torch.fx frontend's op table: how one fx node of a captured block maps to IR ops.

One small rule per op family: :func:`module_rules` for submodule calls (keyed by ``nn.Module``
type, tried in order with ``isinstance`` so subclasses such as Brevitas layers match) and
:data:`FUNCTION_RULES` for function/method calls (keyed by the target's name; exported ATen ops
by their schema name, ``aten::relu`` -> ``"relu"``).  A rule returns ``(IR value, layout kind)``
or None when the node's arguments are outside what it maps (the node then runs on the host).
IR values are channels-last (:mod:`.layout`).  :func:`convert` applies the table;
:func:`~.fx_to_ir.block_to_ir` walks a block and calls it.
"""
from __future__ import annotations

import functools

import numpy as np

from ..ir.layout import NCHW, PLAIN, layout_of

__all__ = ["BatchDim", "as_pair", "Conversion", "module_rules", "FUNCTION_RULES", "target_name", "convert"]


class BatchDim:
    """Marker (the class itself, never instantiated) for the value of ``x.size(0)`` /
    ``x.shape[0]``: the batch dimension, unknown at capture time."""


def as_pair(v):
    """``v`` as a pair: a tuple/list is returned as a tuple, a scalar ``k`` as ``(k, k)`` (kernel,
    stride, padding and dilation arguments of torch layers)."""
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class Conversion:
    """The state of one block's conversion: the IR builder and what each fx node became
    (``dev``: ``(IR value, kind)``, ``const``: a Python/torch value, ``host``: run on the host)."""

    def __init__(self, gm, name):
        from ..ir import GraphBuilder

        self.gm = gm
        self.mods = dict(gm.named_modules())
        self.b = GraphBuilder(name)
        self.dev: dict = {}     # fx node -> (ir value, kind)
        self.const: dict = {}   # fx node -> python/torch value
        self.host: list = []
        self.folded = 0
        self.dev_inputs: list = []

    @staticmethod
    def meta_shape(n):
        """Shape of fx node ``n`` from shape propagation (batch first), or None (not a tensor)."""
        tm = n.meta.get("tensor_meta")
        return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None

    @staticmethod
    def is_float_tensor(n):
        """Whether fx node ``n`` is a float32 tensor (only those can be device inputs)."""
        import torch
        tm = n.meta.get("tensor_meta")
        return tm is not None and hasattr(tm, "dtype") and tm.dtype == torch.float32

    @staticmethod
    def cf(v):
        """A float32 IR :class:`~qdeploy.compiler.ir.Const` from a tensor or number."""
        import torch

        from ..ir import FLOAT32, Const
        return Const(np.asarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v, np.float32), FLOAT32)

    @staticmethod
    def arg_nodes(n):
        """The fx nodes among ``n``'s args and kwargs, in order."""
        import torch
        out = []
        torch.fx.node.map_arg((n.args, n.kwargs), lambda a: out.append(a))
        return out

    def fold(self, n):
        """Evaluate ``n`` now (all its inputs are constants); returns the value, raises what torch raises."""
        import torch

        def resolve(a):
            return torch.fx.node.map_arg(a, lambda x: self.const[x])
        args, kwargs = resolve(n.args), resolve(n.kwargs)
        if n.op == "call_module":
            return self.mods[n.target](*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        return getattr(args[0], n.target)(*args[1:], **kwargs)

    def const_channel(self, c, kind, shape):
        """A constant operand as an Affine param: scalar, or per channel of a device value."""
        import torch
        t = torch.as_tensor(c, dtype=torch.float32)
        if t.numel() == 1:
            return self.cf(t.reshape(()))
        C = shape[1] if shape else None
        if kind == NCHW and tuple(t.shape) in ((C, 1, 1), (1, C, 1, 1)):
            return self.cf(t.reshape(C))
        if kind == PLAIN and len(shape) == 2 and tuple(t.shape) in ((C,), (1, C)):
            return self.cf(t.reshape(C))
        return None

    def add(self, op, ins, attrs=None, params=None, nm=None):
        """Add IR node ``nm`` (op ``op`` on values ``ins``); returns its output value."""
        return self.b.add(nm, op, ins, attrs or {}, params or {})

    def flatten_dev(self, x, kind, shape, nm):
        """Flatten device value ``x`` of torch shape ``shape`` to (C*H*W,) in torch's (C, H, W)
        order: a Transpose back to channels-first (unless H*W is 1) then a Reshape."""
        if kind == PLAIN:
            return x
        _, C, H, W = shape
        if H * W != 1:
            x = self.add("Transpose", [x], {"perm": (2, 0, 1)}, nm=nm + "_chw")
        return self.add("Reshape", [x], {"shape": (C * H * W,)}, nm=nm)

    def global_avg_pool(self, x, n):
        """GlobalAvgPool kept 4-D (``(1, 1, C)``), as ``AdaptiveAvgPool2d(1)`` returns (N, C, 1, 1)."""
        g = self.add("GlobalAvgPool", [x], nm=n.name + "_gap")
        return self.add("Reshape", [g], {"shape": (1, 1, self.meta_shape(n)[1])}, nm=n.name), NCHW


# --------------------------------------------------------------------------- module calls
# Each rule: (cv, fx node, module, (input value, kind)) -> (IR value, kind) or None.

def _passthrough_module(cv, n, m, x):
    return x


def _conv2d(cv, n, m, x):
    xv, xk = x
    if xk != NCHW or m.padding_mode != "zeros" or as_pair(m.dilation) != (1, 1) or isinstance(m.padding, str):
        return None
    w = m.weight.detach().permute(2, 3, 1, 0)
    ph, pw = as_pair(m.padding)
    params = {"weight": cv.cf(w)}
    if m.bias is not None:
        params["bias"] = cv.cf(m.bias)
    return cv.add("Conv", [xv], {"kernel": tuple(m.kernel_size), "strides": as_pair(m.stride),
                                 "pads": (ph, pw, ph, pw), "groups": m.groups}, params, n.name), NCHW


def _linear(cv, n, m, x):
    xv, xk = x
    if xk != PLAIN:
        return None
    params = {"weight": cv.cf(m.weight.detach().t())}
    if m.bias is not None:
        params["bias"] = cv.cf(m.bias)
    return cv.add("Dense", [xv], {}, params, n.name), PLAIN


def _batch_norm(cv, n, m, x):
    import torch
    import torch.nn as nn
    xv, xk = x
    if m.running_mean is None or not ((isinstance(m, nn.BatchNorm2d) and xk == NCHW)
                                      or (isinstance(m, nn.BatchNorm1d) and xk == PLAIN)):
        return None
    s = (m.weight.detach() if m.weight is not None else 1.0) / torch.sqrt(m.running_var + m.eps)
    bias = (m.bias.detach() if m.bias is not None else 0.0) - m.running_mean * s
    return cv.add("Affine", [xv], {}, {"scale": cv.cf(s), "bias": cv.cf(bias)}, n.name), xk


def _relu_module(cv, n, m, x):
    return cv.add("Relu", [x[0]], nm=n.name), x[1]


def _max_pool2d(cv, n, m, x):
    if x[1] != NCHW or m.ceil_mode or as_pair(m.dilation) != (1, 1):
        return None
    k, s, p = as_pair(m.kernel_size), as_pair(m.stride or m.kernel_size), as_pair(m.padding)
    return cv.add("MaxPool", [x[0]], {"kernel": k, "strides": s, "pads": (*p, *p)}, nm=n.name), NCHW


def _avg_pool2d(cv, n, m, x):
    if x[1] != NCHW or as_pair(m.padding) != (0, 0) or m.ceil_mode or m.divisor_override is not None:
        return None
    k, s = as_pair(m.kernel_size), as_pair(m.stride or m.kernel_size)
    return cv.add("AvgPool", [x[0]], {"kernel": k, "strides": s, "pads": (0, 0, 0, 0)}, nm=n.name), NCHW


def _adaptive_avg_pool2d_module(cv, n, m, x):
    if x[1] != NCHW or as_pair(m.output_size) != (1, 1):
        return None
    return cv.global_avg_pool(x[0], n)


def _flatten_module(cv, n, m, x):
    if m.start_dim != 1 or m.end_dim != -1:
        return None
    return cv.flatten_dev(x[0], x[1], cv.meta_shape(n.args[0]), n.name), PLAIN


def _softmax_module(cv, n, m, x):
    if x[1] != PLAIN or m.dim not in (1, -1):
        return None
    return cv.add("Softmax", [x[0]], {"axis": -1}, nm=n.name), PLAIN


@functools.cache
def module_rules() -> tuple:
    """``((module types, rule), ...)`` for ``call_module`` nodes, tried in order: the first rule
    whose types match (``isinstance``) and that returns a value maps the node.  A function so
    that ``torch`` is imported only when a block is converted."""
    import torch.nn as nn
    return (
        ((nn.Identity, nn.Dropout), _passthrough_module),
        (nn.Conv2d, _conv2d),
        (nn.Linear, _linear),
        ((nn.BatchNorm2d, nn.BatchNorm1d), _batch_norm),
        (nn.ReLU, _relu_module),
        (nn.MaxPool2d, _max_pool2d),
        (nn.AvgPool2d, _avg_pool2d),
        (nn.AdaptiveAvgPool2d, _adaptive_avg_pool2d_module),
        (nn.Flatten, _flatten_module),
        (nn.Softmax, _softmax_module),
    )


# --------------------------------------------------------------------------- function / method calls
# Each rule: (cv, fx node, first argument as (IR value, kind) or None) -> (IR value, kind) or None.

def _relu(cv, n, x):
    return (cv.add("Relu", [x[0]], nm=n.name), x[1]) if x is not None else None


def _passthrough(cv, n, x):
    return x


def _flatten(cv, n, x):
    if x is None:
        return None
    args, kw = n.args, n.kwargs
    sd = args[1] if len(args) > 1 else kw.get("start_dim", 1)
    ed = args[2] if len(args) > 2 else kw.get("end_dim", -1)
    if sd == 1 and ed == -1:
        return cv.flatten_dev(x[0], x[1], cv.meta_shape(args[0]), n.name), PLAIN
    return None


def _view(cv, n, x):
    import torch
    if x is None:
        return None
    args, shape = n.args, cv.meta_shape(n)
    tgt = args[1:] if not (len(args) == 2 and isinstance(args[1], (tuple, list))) else args[1]
    tgt = [cv.const.get(a, a) if isinstance(a, torch.fx.Node) else a for a in tgt]
    if len(tgt) == 2 and (tgt[0] is BatchDim or tgt[0] == -1) and shape is not None and len(shape) == 2:
        return cv.flatten_dev(x[0], x[1], cv.meta_shape(args[0]), n.name), PLAIN
    return None


def _softmax(cv, n, x):
    if x is None or x[1] != PLAIN:
        return None
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    return (cv.add("Softmax", [x[0]], {"axis": -1}, nm=n.name), PLAIN) if dim in (1, -1) else None


def _adaptive_avg_pool2d(cv, n, x):
    if x is None or x[1] != NCHW:
        return None
    os_ = n.args[1] if len(n.args) > 1 else n.kwargs.get("output_size")
    return cv.global_avg_pool(x[0], n) if as_pair(os_) == (1, 1) else None


def _mean(cv, n, x):
    if x is None or x[1] != NCHW:
        return None
    args, kw = n.args, n.kwargs
    dims = args[1] if len(args) > 1 else kw.get("dim")
    if tuple(dims or ()) in ((2, 3), (-2, -1)) and not kw.get("keepdim", False) and len(args) <= 2:
        return cv.add("GlobalAvgPool", [x[0]], nm=n.name), PLAIN
    return None


def _cat(cv, n, x):
    xs = n.args[0]
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    dev = cv.dev
    if all(a in dev for a in xs) and len({dev[a][1] for a in xs}) == 1 and dim == 1 and len(xs) >= 2:
        return cv.add("Concat", [dev[a][0] for a in xs], {"axis": -1}, nm=n.name), dev[xs[0]][1]
    return None


_ARITH_BASE = {"iadd": "add", "isub": "sub", "imul": "mul", "div": "truediv"}


def _arith(cv, n, x):
    """``+ - * /`` and ``neg``: two device values of one layout (Add, Mul, Add of a negation),
    or a device value with a scalar / per-channel constant (an Affine)."""
    import torch
    shape = cv.meta_shape(n)
    if shape is None:
        return None
    name, args, kw, nm, cf = target_name(n), n.args, n.kwargs, n.name, cv.cf
    if name == "neg":
        return (cv.add("Affine", [x[0]], {}, {"scale": cf(np.float32(-1))}, nm=nm), x[1]) if x else None
    if len(args) != 2 or kw.get("alpha", 1) != 1:
        return None
    kind = layout_of(len(shape))
    a, c = args
    dev, const, Node = cv.dev, cv.const, torch.fx.Node
    da = dev.get(a) if isinstance(a, Node) else None
    dc = dev.get(c) if isinstance(c, Node) else None
    ca = const[a] if isinstance(a, Node) and a in const else (a if not isinstance(a, Node) else None)
    cc = const[c] if isinstance(c, Node) and c in const else (c if not isinstance(c, Node) else None)
    base = _ARITH_BASE.get(name, name)
    if da and dc:
        if kind is None or da[1] != dc[1] or da[1] != kind or len(cv.meta_shape(a)) != len(cv.meta_shape(c)):
            return None
        if base == "add":
            return cv.add("Add", [da[0], dc[0]], nm=nm), kind
        if base == "mul":
            return cv.add("Mul", [da[0], dc[0]], nm=nm), kind
        if base == "sub":
            neg = cv.add("Affine", [dc[0]], {}, {"scale": cf(np.float32(-1))}, nm=nm + "_neg")
            return cv.add("Add", [da[0], neg], nm=nm), kind
        return None
    if da and cc is not None and isinstance(cc, (int, float, torch.Tensor)) and not isinstance(cc, bool):
        p = cv.const_channel(cc, da[1], cv.meta_shape(a))
        if p is None or cv.meta_shape(a) != shape:
            return None
        if base == "add":
            return cv.add("Affine", [da[0]], {}, {"bias": p}, nm=nm), da[1]
        if base == "sub":
            return cv.add("Affine", [da[0]], {}, {"bias": cf(-p.data)}, nm=nm), da[1]
        if base == "mul":
            return cv.add("Affine", [da[0]], {}, {"scale": p}, nm=nm), da[1]
        if base == "truediv":
            return cv.add("Affine", [da[0]], {}, {"scale": cf(np.float32(1) / p.data)}, nm=nm), da[1]
        return None
    if dc and ca is not None and isinstance(ca, (int, float, torch.Tensor)) and not isinstance(ca, bool):
        p = cv.const_channel(ca, dc[1], cv.meta_shape(c))
        if p is None or cv.meta_shape(c) != shape:
            return None
        if base == "add":
            return cv.add("Affine", [dc[0]], {}, {"bias": p}, nm=nm), dc[1]
        if base == "mul":
            return cv.add("Affine", [dc[0]], {}, {"scale": p}, nm=nm), dc[1]
        if base == "sub":
            return cv.add("Affine", [dc[0]], {}, {"scale": cf(np.float32(-1)), "bias": p}, nm=nm), dc[1]
    return None


#: ``{target name: rule}`` for ``call_function`` / ``call_method`` nodes (a name absent here runs
#: on the host).
FUNCTION_RULES = {
    "relu": _relu, "relu_": _relu,
    "contiguous": _passthrough, "clone": _passthrough, "dropout": _passthrough,
    "flatten": _flatten,
    "view": _view, "reshape": _view,
    "softmax": _softmax,
    "adaptive_avg_pool2d": _adaptive_avg_pool2d,
    "mean": _mean,
    "cat": _cat,
    **{k: _arith for k in ("add", "iadd", "sub", "isub", "mul", "imul", "truediv", "div", "neg")},
}


def target_name(n) -> str:
    """The rule key of a function/method node: an exported ATen op's schema name
    (``aten::relu`` -> ``"relu"``), a method's name, or a function's ``__name__``."""
    import torch
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.name.split("::")[-1]
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def convert(cv: Conversion, n):
    """IR value for fx node ``n`` (returns (value, kind)) or None when it is a host op."""
    import torch
    args = n.args
    x = cv.dev.get(args[0]) if args and isinstance(args[0], torch.fx.Node) else None
    if n.op == "call_module":
        if x is None:
            return None
        m = cv.mods[n.target]
        for types, rule in module_rules():
            if isinstance(m, types):
                r = rule(cv, n, m, x)
                if r is not None:
                    return r
        return None
    if n.op not in ("call_function", "call_method"):
        return None
    rule = FUNCTION_RULES.get(target_name(n))
    return rule(cv, n, x) if rule is not None else None

