"""`DynamicModel`: the host side of a compiled dynamic network (DyCL's generated host module).

The host walks the captured control graph (:class:`~qdeploy.compiler.frontends.program.ControlProgram`):
straight-line blocks run as compiled artifacts (any backend's ``load`` callable), conditions and
the few host ops (reductions, comparisons, ``sigmoid``, indexing...) run with torch on the host.

Batches.  The source model is written for batch 1 (``if tensor:`` needs one element); the host
runs a batch by routing samples: a condition is evaluated per sample, the batch is split into
*frames* (sample subsets) that follow different paths, and frames that reach a join with the same
variables are merged again, so each compiled block runs once per distinct path, batched.

Values between blocks stay in the IR layout (channels-last) on the device side; they are
converted to torch layout only where a host op reads them.

Single samples (``n == 1``, the way eager PyTorch runs these models) take a direct path: the
control graph is turned once into nested closures and each block into generated straight-line
Python (DyCL's generated host module) that calls the backend's batch-1 entry directly when it
offers one (``tvm-llvm``: ``run.entry1``), hands TVM tensors from block to block and shares
torch/numpy inputs zero-copy through DLPack.  Other backends use the same steps through their
``load`` callable.  Results and ``last_stats`` equal the routed path's.

Shared with early exits (:mod:`qdeploy.runtime.multistage`): ``DynamicModel`` is a
:class:`~qdeploy.runtime.multistage.StageHost`, like ``MultiStageModel``.  Device blocks are
stages named ``block<k>``; the routed (batched) path calls them through
``StageHost.call_stage`` and splits sample indices at conditions with ``StageHost.route``;
on disk a compiled dynamic network is the same layout as an early-exit program: ``plan.json``
(``kind: "dynamic"``, the control graph) written with ``write_plan``, one compiled artifact per
stage (``manifest.json`` + ``ir/model``) loaded with ``load_stages`` (:meth:`DynamicModel.load`).
The batch-1 path calls the stages' backend entries directly (generated code, see above), not
through ``call_stage``.
"""
from __future__ import annotations

import numpy as np

from ..compiler.errors import QDeployError
from ..compiler.frontends.layout import NCHW, from_ir, layout_of, to_ir
from ..compiler.frontends.program import BlockItem, IfItem, ReturnItem
from .multistage import PlanError, StageHost, load_stages, read_plan, write_plan

__all__ = ["DynamicModel", "DevVal", "HostVal"]


class DevVal:
    """A batch of device values: ``arr`` (n, *IR shape), IR layout ``kind``; ``tv``: the TVM
    tensor ``arr`` views (zero-copy), passed as is to the next compiled block, or None."""
    __slots__ = ("_arr", "kind", "tv")

    def __init__(self, arr, kind, tv=None):
        self._arr, self.kind, self.tv = arr, kind, tv

    @property
    def arr(self):
        a = self._arr
        if a is None:  # made on first use: a zero-copy view of the backend tensor
            a = self._arr = np.from_dlpack(self.tv)
        return a

    def sample(self, i):
        import torch
        a = self.arr
        return torch.from_numpy(from_ir(a if i == 0 and a.shape[0] == 1 else a[i:i + 1], self.kind))

    def take(self, sel):
        return DevVal(self.arr[sel], self.kind)

    def sig(self):
        return ("D", self.kind, self.arr.shape[1:], self.arr.dtype.str)


class HostVal:
    """A batch of host values: one torch value per sample (as the batch-1 source computes it)."""
    __slots__ = ("items",)

    def __init__(self, items):
        self.items = items

    def sample(self, i):
        return self.items[i]

    def take(self, sel):
        return HostVal([self.items[j] for j in np.flatnonzero(sel)] if sel.dtype == bool else [self.items[j] for j in sel])

    def sig(self):
        return ("H",)


def _as_device(v, kind):
    if isinstance(v, DevVal):
        return v.arr
    import torch
    a = torch.cat([torch.as_tensor(t) for t in v.items]).numpy().astype(np.float32, copy=False)
    return to_ir(a) if kind == NCHW else a


class _NoGen(Exception):
    """A block the batch-1 code generator does not handle (the closure step is used)."""


def _dev_input1(v, kind):
    """Batch-1 value -> device input for a generated step (torch tensor or numpy array)."""
    if isinstance(v, DevVal):
        if v.tv is not None:
            return v.tv
        return np.ascontiguousarray(v.arr, dtype=np.float32)
    return _host1_to_device(v, kind)


def _single_torch(x) -> bool:
    """A batch-1 float32 CPU torch tensor (the fast ``run`` path takes it without numpy)."""
    if type(x).__module__ == "numpy":
        return False
    import torch

    return (isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == 1 and x.dtype == torch.float32
            and not x.is_cuda and x.device.type == "cpu")


def _host1_to_device(v, kind):
    """One-sample host value -> device input (torch float32 tensor in IR layout when possible,
    else a numpy array; the backend shares it zero-copy when aligned)."""
    import torch

    t = v.items[0] if len(v.items) == 1 else None
    if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and not t.requires_grad:
        if kind == NCHW and t.dim() == 4:
            return t.permute(0, 2, 3, 1).contiguous()
        if kind != NCHW and t.dim() == 2:
            return t.contiguous()
    return np.ascontiguousarray(_as_device(v, kind), dtype=np.float32)


def _to_numpy(v):
    """Batch value -> torch-layout numpy array (n, ...)."""
    if isinstance(v, DevVal):
        return from_ir(v.arr, v.kind)
    import torch
    items = v.items
    if items and isinstance(items[0], torch.Tensor) and items[0].dim() >= 1 and items[0].shape[0] == 1:
        return torch.cat(items).numpy()
    return np.asarray([np.asarray(t) for t in items])


class _Plan:
    __slots__ = ("tensors", "in_vars", "out_names", "host", "leaves", "wanted", "stage")

    def __init__(self):
        self.stage = None
        self.tensors, self.in_vars, self.out_names = None, [], []
        self.host, self.leaves, self.wanted = [], [], []


def _fx_nodes(a):
    """The fx nodes inside a (nested) argument structure."""
    import torch

    found = []
    torch.fx.node.map_arg(a, lambda n: found.append(n) or n)
    return found


def _binder(a):
    """``f(vals) -> a`` with every fx node in ``a`` replaced by ``vals[node.name]`` (built once
    per host node instead of mapping the arguments on every call)."""
    import torch

    if isinstance(a, torch.fx.Node):
        nm = a.name
        return lambda v: v[nm]
    if isinstance(a, (tuple, list)):
        if not _fx_nodes(a):
            return lambda v: a
        fs = [_binder(x) for x in a]
        t = type(a)
        if t is tuple and len(fs) == 1:
            f0 = fs[0]
            return lambda v: (f0(v),)
        if t is tuple and len(fs) == 2:
            f0, f1 = fs
            return lambda v: (f0(v), f1(v))
        if t is tuple:
            return lambda v: tuple([f(v) for f in fs])
        if t is list:
            return lambda v: [f(v) for f in fs]
        return lambda v: t(*(f(v) for f in fs))  # named tuples
    if isinstance(a, dict):
        if not _fx_nodes(a):
            return lambda v: a
        fs = {k: _binder(x) for k, x in a.items()}
        return lambda v: {k: f(v) for k, f in fs.items()}
    if isinstance(a, slice):
        if not _fx_nodes((a.start, a.stop, a.step)):
            return lambda v: a
        f0, f1, f2 = _binder(a.start), _binder(a.stop), _binder(a.step)
        return lambda v: slice(f0(v), f1(v), f2(v))
    return lambda v: a


def _node_call(nd, call):
    """``f(vals)`` evaluating the fx node ``nd`` (``call(args, kwargs)``) on named values."""
    fa, fk = _binder(nd.args), _binder(nd.kwargs)
    if nd.op == "call_function" and not nd.kwargs:
        f = nd.target
        return lambda v: f(*fa(v))
    if nd.op == "call_method" and nd.args and not _fx_nodes(nd.kwargs):
        name, f0, rest, kw = nd.target, _binder(nd.args[0]), _binder(tuple(nd.args[1:])), dict(nd.kwargs)
        return lambda v: getattr(f0(v), name)(*rest(v), **kw)
    return lambda v: call(fa(v), fk(v))


class _Frame:
    __slots__ = ("idx", "env")

    def __init__(self, idx, env):
        self.idx, self.env = idx, env

    def sig(self):
        return tuple(sorted((k, v.sig()) for k, v in self.env.items()))


def _merge(frames):
    if len(frames) < 2:
        return frames
    groups: dict = {}
    for f in frames:
        groups.setdefault(f.sig(), []).append(f)
    out = []
    for fs in groups.values():
        if len(fs) == 1:
            out.append(fs[0])
            continue
        env = {}
        for k, v in fs[0].env.items():
            if isinstance(v, DevVal):
                env[k] = DevVal(np.concatenate([f.env[k].arr for f in fs]), v.kind)
            else:
                env[k] = HostVal([x for f in fs for x in f.env[k].items])
        out.append(_Frame(np.concatenate([f.idx for f in fs]), env))
    return out


def stage_name(block_id: int) -> str:
    """Stage name (and artifact directory) of device block ``block_id``: ``block<k>``."""
    return f"block{block_id}"


def control_json(items) -> list:
    """JSON form of a control graph (``plan.json`` ``control``): ``{"block", "stage", "inputs",
    "outputs", "lines"}``, ``{"if", "cond", "test", "line", "then", "else"}``, ``{"return",
    "values", "tuple"}``; ``stage`` is None for a block removed from the device side."""
    out = []
    for it in items:
        if isinstance(it, BlockItem):
            out.append({"block": it.id, "inputs": list(it.inputs), "outputs": list(it.outputs),
                        "lines": list(it.lines)})
        elif isinstance(it, IfItem):
            out.append({"if": it.id, "cond": it.cond_var, "test": it.test_src, "line": it.line,
                        "then": control_json(it.then), "else": control_json(it.orelse)})
        else:
            out.append({"return": it.id, "values": list(it.names), "tuple": bool(it.is_tuple)})
    return out


class DynamicModel(StageHost):
    """A compiled dynamic network.

    Args:
        program: the captured control graph.
        blocks: ``{block id: (BlockIR, device callable or None)}``.
        report: the compile report (dict; see :func:`qdeploy.passes.dynamic.compile_dynamic`).

    Attributes:
        last_stats: after each run, ``{"returns": {return id: samples}, "taken": {if id: [true, false]},
            "block_calls": device calls made}``.
    """

    def __init__(self, program, blocks: dict, report: dict | None = None, workdir=None):
        self.program = program
        self.blocks = blocks
        self.report = report or {}
        self.workdir = workdir
        self.last_stats: dict = {}
        self.stages = {stage_name(bid): fn for bid, (_bir, fn) in blocks.items() if fn is not None}

    # ------------------------------------------------------------------ persistence
    @property
    def plan(self) -> dict:
        """The ``plan.json`` content (without ``format``): ``kind: "dynamic"``, target, capture
        path, inputs, ``stages`` (one per device block: name, dir, IR inputs/outputs, graph
        digest), ``control`` (:func:`control_json`) and the compile report."""
        stages, control = [], control_json(self.program.items)
        for bid, (bir, fn) in sorted(self.blocks.items()):
            if fn is None:
                continue
            stages.append({"name": stage_name(bid), "dir": stage_name(bid), "inputs": list(bir.graph.inputs),
                           "outputs": list(bir.graph.outputs), "graph_digest": bir.graph.digest()})
        for c in (c for c in _walk_json(control) if "block" in c):
            c["stage"] = stage_name(c["block"]) if self.blocks[c["block"]][1] is not None else None
        return {"kind": "dynamic", "target": self.report.get("target"),
                "capture": getattr(self.program, "capture", "ast"), "inputs": list(self.program.arg_names),
                "stages": stages, "control": control, "report": self.report}

    def save_plan(self, out_dir=None):
        """Write ``plan.json`` next to the block artifacts (default: ``workdir``); returns its path."""
        out_dir = out_dir if out_dir is not None else self.workdir
        if out_dir is None:
            raise PlanError("no directory to save the plan in")
        return write_plan(out_dir, self.plan)

    @classmethod
    def load(cls, out_dir, module, example_inputs) -> "DynamicModel":
        """Load a compiled dynamic network written by :func:`~qdeploy.passes.dynamic.compile_dynamic`:
        ``plan.json`` and the block artifacts are read, the host program (conditions, host ops)
        is re-captured from ``module`` (the same capture path as at compile time; nothing is
        recompiled) and checked against the plan.

        Args:
            out_dir: the compile ``out_dir``.
            module / example_inputs: the model (eval mode) and a batch-1 example, as compiled.
        Raises:
            PlanError: no/unreadable plan, a block artifact missing, or a model whose control
                graph or block graphs differ from the compiled ones (digest mismatch).
        """
        from ..passes.dynamic import capture, extract

        plan = read_plan(out_dir, "dynamic")
        method = "export" if plan.get("capture") == "torch.export" else "ast"
        prog = capture(module, example_inputs, method=method)
        if control_json(prog.items) != _strip_stage(plan["control"]):
            raise PlanError(f"{out_dir}: the model's control graph differs from the compiled plan")
        birs = extract(prog, plan.get("report", {}).get("model") or type(module).__name__)
        loaded = load_stages(out_dir, plan)
        blocks = {}
        for bid, bir in birs.items():
            st = loaded.get(stage_name(bid))
            if (bir.graph is None) != (st is None):
                raise PlanError(f"{out_dir}: block {bid} device part differs from the compiled plan")
            if st is not None and st.graph.digest() != bir.graph.digest():
                raise PlanError(f"{out_dir}: block {bid} graph differs from the compiled artifact "
                                f"(model weights or code changed)")
            blocks[bid] = (bir, st._fn if st is not None else None)
        return cls(prog, blocks, dict(plan.get("report") or {}), out_dir)

    # ------------------------------------------------------------------ public
    def run(self, *inputs):
        """Run on batch-first inputs in the source layout (numpy arrays or torch tensors).

        Returns:
            a float32 numpy array (n, ...) -- or a tuple of them when ``forward`` returns a tuple.
        """
        if len(inputs) != len(self.program.arg_names):
            raise QDeployError(f"model takes {len(self.program.arg_names)} input(s), got {len(inputs)}")
        self.last_stats = {"returns": {}, "taken": {}, "block_calls": 0}
        if inputs and all(_single_torch(x) for x in inputs):
            return self._run1(self._env1_torch(inputs))
        arrs = [np.ascontiguousarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float32)
                for x in inputs]
        n = arrs[0].shape[0]
        env = {}
        for name, a in zip(self.program.arg_names, arrs):
            kind = layout_of(a.ndim)
            if kind is None:
                import torch
                env[name] = HostVal([torch.from_numpy(a[i:i + 1]) for i in range(n)])
            else:
                env[name] = DevVal(to_ir(a), kind)
        self._results: dict = {}
        if n == 1:
            return self._run1(env)
        left = self._seq(self.program.items, [_Frame(np.arange(n), env)])
        if left:
            raise QDeployError("a path through forward ended without `return`")
        return self._assemble(n)

    __call__ = run

    def predict(self, *inputs):
        return self.run(*inputs)

    # ------------------------------------------------------------------ batch 1
    # DyCL generates a host module; the equivalent here is to turn the control graph into
    # nested Python closures once (``_compile1``), so that a batch-1 call does no item dispatch,
    # no frame routing and no per-sample argument mapping.

    def _run1(self, env):
        steps = self.__dict__.get("_steps1")
        if steps is None:
            steps = self._steps1 = self._compile1(self.program.items)
        import torch

        if torch.is_grad_enabled():
            with torch.no_grad():
                return self._run1(env)
        for st in steps:
            r = st(env)
            if r is not None:
                return r
        raise QDeployError("a path through forward ended without `return`")

    def _env1_torch(self, inputs):
        """Batch-1 environment straight from torch CPU float32 tensors: device inputs keep a
        contiguous torch tensor in IR layout (``tv``, shared zero-copy by the backend)."""
        import torch

        env = {}
        for name, x in zip(self.program.arg_names, inputs):
            x = x.detach()
            kind = layout_of(x.dim())
            if kind is None:
                env[name] = HostVal([x.contiguous()])
                continue
            t = x.permute(0, 2, 3, 1).contiguous() if kind == NCHW else x.contiguous()
            if t.data_ptr() % 64:
                t = t.clone(memory_format=torch.contiguous_format)
            env[name] = DevVal(None, kind, t)  # numpy view made on first use
        return env

    def _compile1(self, items):
        """Closures ``step(env) -> None | outputs`` for ``items`` (one sample)."""
        steps = []
        for it in items:
            if isinstance(it, BlockItem):
                steps.append(self._block_step(it))
            elif isinstance(it, IfItem):
                steps.append(self._if_step(it))
            elif isinstance(it, ReturnItem):
                steps.append(self._return_step(it))
                break
        return steps

    def _if_step(self, it):
        then, orelse = self._compile1(it.then), self._compile1(it.orelse)
        var, iid = it.cond_var, it.id
        stats = self.__dict__

        def step(env):
            v = env[var]
            if isinstance(v, HostVal):
                c = bool(v.items[0])
            else:
                c = bool(self._cond(v, 1)[0])
            taken = stats["last_stats"]["taken"]
            st = taken.get(iid)
            if st is None:
                st = taken[iid] = [0, 0]
            if c:
                st[0] += 1
                body = then
            else:
                st[1] += 1
                body = orelse
            for s_ in body:
                r = s_(env)
                if r is not None:
                    return r
            return None

        return step

    def _return_step(self, it):
        names, rid, is_tuple = list(it.names), it.id, it.is_tuple
        stats = self.__dict__

        def step(env):
            outs = []
            for nm in names:
                v = _to_numpy(env[nm])
                dt = v.dtype if v.dtype != np.float64 else np.float32
                outs.append(np.array(v, dtype=dt, copy=True))
            r = stats["last_stats"]["returns"]
            r[rid] = r.get(rid, 0) + 1
            return tuple(outs) if is_tuple else outs[0]

        return step

    def _block_step(self, it):
        """The batch-1 step of a block: generated straight-line code when possible
        (:meth:`_gen_block_step`), else the generic closure."""
        try:
            st = self._gen_block_step(it)
        except _NoGen:
            st = None
        return st if st is not None else self._closure_block_step(it)

    def _gen_block_step(self, it):
        """Generate Python source for one block (DyCL's generated host code): the compiled
        entry called directly, host ops as direct calls on local variables, no dicts of
        intermediate values.  Raises ``_NoGen`` for anything it does not handle."""
        bir, fn = self.blocks[it.id]
        entry = getattr(fn, "entry1", None) or getattr(fn, "entry", None) if fn is not None else None
        if fn is not None and entry is None:
            raise _NoGen()
        plan = self._plan(it.id)
        ns = {"DevVal": DevVal, "HostVal": HostVal, "_in": _dev_input1, "STATS": self.__dict__}
        consts: list = []
        lines = ["def step(env):"]

        def const(v):
            consts.append(v)
            return f"C[{len(consts) - 1}]"

        local = {}  # fx node name -> python expression for host evaluation (torch values)
        dev_local = {}  # fx node name -> local holding its DevVal
        counter = iter(range(1 << 30))
        if fn is not None:
            by_name = {irn: (var, kind) for var, irn, kind in bir.dev_inputs}
            ns.update(ENTRY=entry, TT=fn.tensor_type, CONV=fn.to_tensor)
            args = []
            for j, irn in enumerate(fn.input_names):
                var, kind = by_name[irn]
                lines.append(f"    v{j} = env[{var!r}]")
                lines.append(f"    a{j} = v{j}.tv if (v{j}.__class__ is DevVal and v{j}.tv.__class__ is TT) "
                             f"else CONV(_in(v{j}, {kind!r}))")
                args.append(f"a{j}")
            lines.append(f"    r = ENTRY({', '.join(args)}{',' if len(args) == 1 else ''})")
            outs = list(fn.output_names)
            for node, (irv, kind) in bir.dev_outputs.items():
                dev_local[node] = f"d_{next(counter)}"
                lines.append(f"    {dev_local[node]} = DevVal(None, {kind!r}, r[{outs.index(irv)}])")
            lines.append("    STATS['last_stats']['block_calls'] += 1")
        if bir.host_nodes:
            names = set(bir.host_nodes)
            for nm, src, ref in plan.leaves:
                v = f"l_{next(counter)}"
                if src == "env":
                    lines.append(f"    {v} = env[{ref!r}].sample(0)")
                elif src == "dev":
                    lines.append(f"    {v} = {dev_local[nm]}.sample(0)")
                else:
                    v = const(ref)
                local[nm] = v
            mods = dict(bir.gm.named_modules())

            def expr(a):
                import torch

                if isinstance(a, torch.fx.Node):
                    if a.name not in local:
                        raise _NoGen()
                    return local[a.name]
                if isinstance(a, tuple) and type(a) is tuple:
                    return "(" + "".join(expr(x) + ", " for x in a) + ")"
                if type(a) is list:
                    return "[" + ", ".join(expr(x) for x in a) + "]"
                if isinstance(a, slice):
                    return f"slice({expr(a.start)}, {expr(a.stop)}, {expr(a.step)})"
                if isinstance(a, dict) or (isinstance(a, tuple) and _fx_nodes(a)):
                    raise _NoGen()
                if a is None or isinstance(a, (bool, int)):
                    return repr(a)
                return const(a)

            for nd, _call in self._host_nodes(bir):
                if nd.name not in names:
                    continue
                argl = [expr(a) for a in nd.args] + [f"{k}={expr(v)}" for k, v in nd.kwargs.items()]
                if any(not k.isidentifier() for k in nd.kwargs):
                    raise _NoGen()
                if nd.op == "call_function":
                    call = f"{const(nd.target)}({', '.join(argl)})"
                elif nd.op == "call_module":
                    call = f"{const(mods[nd.target])}({', '.join(argl)})"
                elif nd.op == "call_method" and str(nd.target).isidentifier() and nd.args:
                    call = f"{argl[0]}.{nd.target}({', '.join(argl[1:])})"
                else:
                    raise _NoGen()
                local[nd.name] = f"h_{next(counter)}"
                lines.append(f"    {local[nd.name]} = {call}")
        rhs = []
        for var, (src, ref) in bir.outputs.items():
            if src == "dev":
                rhs.append((var, dev_local[ref]))
            elif src == "host":
                rhs.append((var, f"HostVal([{local[ref]}])"))
            elif src == "alias":
                rhs.append((var, f"env[{ref!r}]"))
            else:
                rhs.append((var, f"HostVal([{const(ref)}])"))
        for j, (var, e) in enumerate(rhs):  # read everything (aliases) before writing
            lines.append(f"    o{j} = {e}")
        for j, (var, _) in enumerate(rhs):
            lines.append(f"    env[{var!r}] = o{j}")
        lines.append("    return None")
        ns["C"] = consts
        src_text = "\n".join(lines) + "\n"
        exec(compile(src_text, f"<qdeploy block {it.id}>", "exec"), ns)  # noqa: S102 - our own source
        step = ns["step"]
        step.source = src_text
        return step

    def _closure_block_step(self, it):
        bir, fn = self.blocks[it.id]
        plan = self._plan(it.id)
        stats = self.__dict__
        tensors = getattr(fn, "tensors1", None) or plan.tensors  # static batch-1 entry if built
        in_vars = plan.in_vars
        out_pos = ([(node, plan.out_names.index(irv), kind) for node, (irv, kind) in bir.dev_outputs.items()]
                   if tensors is not None else [])
        dev_inputs, dev_outputs = bir.dev_inputs, bir.dev_outputs
        leaves, host = plan.leaves, plan.host
        outputs = list(bir.outputs.items())
        has_alias = any(src == "alias" for src, _ in bir.outputs.values())

        def step(env):
            dev_res = {}
            if tensors is not None:
                args = []
                for var, kind in in_vars:
                    v = env[var]
                    if isinstance(v, DevVal):
                        args.append(v.tv if v.tv is not None else np.ascontiguousarray(v.arr, dtype=np.float32))
                    else:
                        args.append(_host1_to_device(v, kind))
                outs = tensors(args)
                for node, i, kind in out_pos:
                    dev_res[node] = DevVal(None, kind, outs[i])
                stats["last_stats"]["block_calls"] += 1
            elif fn is not None:
                res = fn({irn: _as_device(env[var], kind) for var, irn, kind in dev_inputs})
                stats["last_stats"]["block_calls"] += 1
                dev_res = {node: DevVal(res[irv], kind) for node, (irv, kind) in dev_outputs.items()}
            if host:
                vals = {}
                for nm, src, ref in leaves:
                    if src == "env":
                        vals[nm] = env[ref].sample(0)
                    elif src == "dev":
                        vals[nm] = dev_res[nm].sample(0)
                    else:
                        vals[nm] = ref
                for nm, call in host:
                    vals[nm] = call(vals)
            upd = {} if has_alias else env  # aliases read the block's *input* env
            for var, (src, ref) in outputs:
                if src == "dev":
                    upd[var] = dev_res[ref]
                elif src == "host":
                    upd[var] = HostVal([vals[ref]])
                elif src == "alias":
                    upd[var] = env[ref]
                else:
                    upd[var] = HostVal([ref])
            if has_alias:
                env.update(upd)
            return None

        return step

    def _device(self, plan, bir, fn, env):
        """Call a block's compiled graph; ``{fx node: DevVal}`` of its device outputs."""
        if plan.tensors is not None:
            args = []
            for var, kind in plan.in_vars:
                v = env[var]
                tv = v.tv if isinstance(v, DevVal) else None
                args.append(tv if tv is not None else
                            np.ascontiguousarray(_as_device(v, kind), dtype=np.float32))
            res = dict(zip(plan.out_names, plan.tensors(args)))
            self.last_stats["block_calls"] += 1
            return {node: DevVal(np.from_dlpack(res[irv]), kind, res[irv])
                    for node, (irv, kind) in bir.dev_outputs.items()}
        res = self.call_stage(plan.stage, {irn: _as_device(env[var], kind) for var, irn, kind in bir.dev_inputs})
        self.last_stats["block_calls"] += 1
        return {node: DevVal(res[irv], kind) for node, (irv, kind) in bir.dev_outputs.items()}

    def _plan(self, bid):
        """Per-block call plan (cached): device input order for ``raw``, host-op closures."""
        plans = self.__dict__.setdefault("_plans", {})
        p = plans.get(bid)
        if p is not None:
            return p
        bir, fn = self.blocks[bid]
        p = _Plan()
        p.stage = stage_name(bid)
        tensors = getattr(fn, "tensors", None) if fn is not None else None
        if tensors is not None:
            by_name = {irn: (var, kind) for var, irn, kind in bir.dev_inputs}
            p.tensors, p.in_vars, p.out_names = tensors, [by_name[n] for n in fn.input_names], list(fn.output_names)
        if bir.host_nodes:
            names = set(bir.host_nodes)
            leaves = {}
            for nd, call in self._host_nodes(bir):
                for a in _fx_nodes((nd.args, nd.kwargs)):
                    if a.name in names or a.name in leaves:
                        continue
                    if a.op == "placeholder":
                        leaves[a.name] = ("env", a.target)
                    elif a.name in bir.dev_outputs:
                        leaves[a.name] = ("dev", None)
                    elif a.name in bir.node_alias:
                        leaves[a.name] = ("env", bir.node_alias[a.name])
                    else:
                        leaves[a.name] = ("const", bir.consts[a.name])
                p.host.append((nd.name, _node_call(nd, call)))
            p.leaves = [(k, s, r) for k, (s, r) in leaves.items()]
            p.wanted = [ref for src, ref in bir.outputs.values() if src == "host"]
        plans[bid] = p
        return p

    # ------------------------------------------------------------------ control
    def _seq(self, items, frames):
        for it in items:
            if not frames:
                return frames
            if isinstance(it, BlockItem):
                for f in frames:
                    self._block(it, f)
            elif isinstance(it, IfItem):
                tf, ff = [], []
                nt = 0
                for f in frames:
                    m = self._cond(f.env[it.cond_var], len(f.idx))
                    nt += int(m.sum())
                    if m.all():
                        tf.append(f)
                    elif not m.any():
                        ff.append(f)
                    else:
                        it_rows, if_rows = self.route(f.idx, m)
                        tf.append(_Frame(it_rows, {k: v.take(m) for k, v in f.env.items()}))
                        ff.append(_Frame(if_rows, {k: v.take(~m) for k, v in f.env.items()}))
                tot = sum(len(f.idx) for f in frames)
                st = self.last_stats["taken"].setdefault(it.id, [0, 0])
                st[0] += nt
                st[1] += tot - nt
                frames = _merge(self._seq(it.then, tf) + self._seq(it.orelse, ff))
            elif isinstance(it, ReturnItem):
                for f in frames:
                    vals = [_to_numpy(f.env[nm]) for nm in it.names]
                    self._results.setdefault(it.id, []).append((f.idx, vals, it.is_tuple))
                    self.last_stats["returns"][it.id] = self.last_stats["returns"].get(it.id, 0) + len(f.idx)
                return []
        return frames

    @staticmethod
    def _cond(v, n):
        if isinstance(v, DevVal):
            a = v.arr.reshape(n, -1)
            if a.shape[1] != 1:
                raise QDeployError(f"condition on a tensor of {a.shape[1]} elements per sample is ambiguous")
            return a[:, 0].astype(bool)
        return np.fromiter((bool(x) for x in v.items), dtype=bool, count=n)

    def _block(self, it, frame):
        import torch

        bir, fn = self.blocks[it.id]
        env = frame.env
        n = len(frame.idx)
        dev_res = {}
        if fn is not None:
            dev_res = self._device(self._plan(it.id), bir, fn, env)
        host_res = {}
        if bir.host_nodes:
            nodes = self._host_nodes(bir)
            wanted = [ref for src, ref in bir.outputs.values() if src == "host"]
            per = {w: [] for w in wanted}
            with torch.no_grad():
                for i in range(n):
                    vals = {}

                    def look(a, i=i, vals=vals):
                        nm = a.name
                        if nm in vals:
                            return vals[nm]
                        if a.op == "placeholder":
                            r = env[a.target].sample(i)
                        elif nm in dev_res:
                            r = dev_res[nm].sample(i)
                        elif nm in bir.node_alias:
                            r = env[bir.node_alias[nm]].sample(i)
                        else:
                            r = bir.consts[nm]
                        vals[nm] = r
                        return r

                    for nd, call in nodes:
                        args = torch.fx.node.map_arg(nd.args, look)
                        kwargs = torch.fx.node.map_arg(nd.kwargs, look)
                        vals[nd.name] = call(args, kwargs)
                    for w in wanted:
                        per[w].append(vals[w])
            host_res = {w: HostVal(v) for w, v in per.items()}
        new = dict(env)
        for var, (src, ref) in bir.outputs.items():
            if src == "dev":
                new[var] = dev_res[ref]
            elif src == "host":
                new[var] = host_res[ref]
            elif src == "alias":
                new[var] = env[ref]
            else:
                new[var] = HostVal([ref] * n)
        frame.env = new

    def _host_nodes(self, bir):
        cache = getattr(bir, "_host_calls", None)
        if cache is not None:
            return cache
        mods = dict(bir.gm.named_modules())
        names = set(bir.host_nodes)
        out = []
        for nd in bir.gm.graph.nodes:
            if nd.name not in names:
                continue
            if nd.op == "call_module":
                m = mods[nd.target]
                call = (lambda a, k, m=m: m(*a, **k))
            elif nd.op == "call_function":
                call = (lambda a, k, f=nd.target: f(*a, **k))
            else:
                call = (lambda a, k, t=nd.target: getattr(a[0], t)(*a[1:], **k))
            out.append((nd, call))
        bir._host_calls = out
        return out

    def _assemble(self, n):
        pieces = [p for v in self._results.values() for p in v]
        if not pieces:
            raise QDeployError("no sample reached a return")
        k = len(pieces[0][1])
        outs = []
        for j in range(k):
            ref = pieces[0][1][j]
            arr = np.zeros((n, *ref.shape[1:]), dtype=ref.dtype if ref.dtype != np.float64 else np.float32)
            for idx, vals, _ in pieces:
                if vals[j].shape[1:] != ref.shape[1:]:
                    raise QDeployError(f"returns of different shapes {ref.shape[1:]} and {vals[j].shape[1:]}")
                arr[idx] = vals[j]
            outs.append(arr)
        return tuple(outs) if pieces[0][2] else outs[0]


def _walk_json(control):
    for c in control:
        yield c
        if "if" in c:
            yield from _walk_json(c["then"])
            yield from _walk_json(c["else"])


def _strip_stage(control):
    return [{k: (_strip_stage(v) if k in ("then", "else") else v) for k, v in c.items() if k != "stage"}
            for c in control]
