"""`DynamicModel`: the host side of a compiled dynamic network (DyCL's generated host module).

The host walks the saved control plan (:class:`~qdeploy.runtime.dynamic.plan.ControlPlan`):
straight-line blocks run as compiled artifacts (any backend's ``load`` callable), conditions and
the few host ops (reductions, comparisons, ``sigmoid``, indexing...) run with torch on the host.

Batches.  The source model is written for batch 1 (``if tensor:`` needs one element); the host
runs a batch by routing samples: a condition is evaluated per sample, the batch is split into
*frames* (sample subsets) that follow different paths, and frames that reach a join with the same
variables are merged again, so each compiled block runs once per distinct path, batched.

Values between blocks stay in the IR layout (channels-last) on the device side; they are
converted to torch layout only where a host op reads them.  Single samples take the generated
batch-1 path (:class:`~qdeploy.runtime.dynamic.codegen.Batch1Host`).

Shared with early exits (:mod:`qdeploy.runtime.multistage`): ``DynamicModel`` is a
:class:`~qdeploy.runtime.multistage.StageHost`, like ``MultiStageModel``.  Device blocks are
stages named ``block<k>``; the routed (batched) path calls them through
``StageHost.call_stage`` and splits sample indices at conditions with ``StageHost.route``;
on disk a compiled dynamic network is the same layout as an early-exit program: ``plan.json``
(``kind: "dynamic"``, the control graph) written with ``write_plan``, one compiled artifact per
stage (``manifest.json`` + ``ir/model``) loaded with ``load_stages``, plus the host program
``host.pt`` (:mod:`qdeploy.runtime.dynamic.plan`); :meth:`DynamicModel.load` needs nothing else.
"""
from __future__ import annotations

import numpy as np

from ...compiler.errors import QDeployError
from ...compiler.ir.layout import layout_of, to_ir
from ..multistage import PlanError, StageHost, load_stages, read_plan, write_plan
from .codegen import Batch1Host
from .plan import (HOST_PROGRAM, BlockStep, ControlPlan, IfStep, ReturnStep, control_from_json, control_json,
                   load_host_program, save_host_program, stage_name)
from .values import BlockCallPlan, DevVal, HostVal, as_device, fx_nodes, node_call, single_torch, to_numpy

__all__ = ["DynamicModel"]


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


class DynamicModel(Batch1Host, StageHost):
    """A compiled dynamic network.

    Args:
        program: the control plan (:class:`~qdeploy.runtime.dynamic.plan.ControlPlan`).
        blocks: ``{block id: (block, device callable or None)}``; a block is a
            :class:`~qdeploy.runtime.dynamic.plan.HostBlock` (or the frontend's ``BlockIR``, which
            has the same attributes).
        report: the compile report (dict; see :func:`qdeploy.dynamic.compile_dynamic`).
        workdir: the program directory (``plan.json`` is saved there by default).

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
        digest), ``control`` (:func:`~qdeploy.runtime.dynamic.plan.control_json`, each block with
        its ``stage`` or None), the ``host_program`` file and the compile report."""
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
                "stages": stages, "control": control, "host_program": HOST_PROGRAM, "report": self.report}

    def save_plan(self, out_dir=None):
        """Write ``plan.json`` and the host program ``host.pt`` next to the block artifacts
        (default: ``workdir``); returns the ``plan.json`` path.

        Raises:
            PlanError: no directory, or a host op that cannot be saved.
        """
        out_dir = out_dir if out_dir is not None else self.workdir
        if out_dir is None:
            raise PlanError("no directory to save the plan in")
        save_host_program(out_dir, {bid: bir for bid, (bir, _fn) in self.blocks.items()})
        return write_plan(out_dir, self.plan)

    @classmethod
    def load(cls, out_dir) -> "DynamicModel":
        """Load a compiled dynamic network written by :func:`qdeploy.dynamic.compile_dynamic` from
        its saved plan alone: ``plan.json`` (control graph), ``host.pt`` (host ops) and the block
        artifacts; nothing is recompiled or re-captured, the model is not needed.

        Raises:
            PlanError: no/unreadable plan or host program, a block artifact missing, or a block
                artifact whose graph differs from the plan (graph digest mismatch).
        """
        plan = read_plan(out_dir, "dynamic")
        items = control_from_json(plan.get("control") or [])
        loaded = load_stages(out_dir, plan)
        digests = {s["name"]: s.get("graph_digest") for s in plan.get("stages", [])}
        graphs = {}
        for c in (c for c in _walk_json(plan.get("control") or []) if "block" in c):
            bid, name = int(c["block"]), c.get("stage")
            st = loaded.get(name) if name is not None else None
            if name is not None and st is None:
                raise PlanError(f"{out_dir}: block {bid} stage {name!r} is not in the plan's stages")
            if st is not None and st.graph.digest() != digests.get(name):
                raise PlanError(f"{out_dir}: block {bid} graph differs from the compiled plan "
                                f"(artifact {name} changed)")
            graphs[bid] = (st.graph if st is not None else None, st)
        hosts = load_host_program(out_dir, {bid: g for bid, (g, _st) in graphs.items()})
        blocks = {bid: (hosts[bid], st._fn if st is not None else None) for bid, (_g, st) in graphs.items()}
        program = ControlPlan(items, list(plan.get("inputs") or []), plan.get("capture", "ast"))
        return cls(program, blocks, dict(plan.get("report") or {}), out_dir)

    # ------------------------------------------------------------------ public
    def run(self, *inputs):
        """Run on batch-first inputs in the source layout (numpy arrays or torch tensors).

        Returns:
            a float32 numpy array (n, ...) -- or a tuple of them when ``forward`` returns a tuple.
        """
        if len(inputs) != len(self.program.arg_names):
            raise QDeployError(f"model takes {len(self.program.arg_names)} input(s), got {len(inputs)}")
        self.last_stats = {"returns": {}, "taken": {}, "block_calls": 0}
        if inputs and all(single_torch(x) for x in inputs):
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
        """Same as :meth:`run`."""
        return self.run(*inputs)


    def _device(self, plan, bir, fn, env):
        """Call a block's compiled graph; ``{fx node: DevVal}`` of its device outputs."""
        if plan.tensors is not None:
            args = []
            for var, kind in plan.in_vars:
                v = env[var]
                tv = v.tv if isinstance(v, DevVal) else None
                args.append(tv if tv is not None else
                            np.ascontiguousarray(as_device(v, kind), dtype=np.float32))
            res = dict(zip(plan.out_names, plan.tensors(args)))
            self.last_stats["block_calls"] += 1
            return {node: DevVal(np.from_dlpack(res[irv]), kind, res[irv])
                    for node, (irv, kind) in bir.dev_outputs.items()}
        res = self.call_stage(plan.stage, {irn: as_device(env[var], kind) for var, irn, kind in bir.dev_inputs})
        self.last_stats["block_calls"] += 1
        return {node: DevVal(res[irv], kind) for node, (irv, kind) in bir.dev_outputs.items()}

    def _plan(self, bid):
        """Per-block call plan (cached): device input order for ``raw``, host-op closures."""
        plans = self.__dict__.setdefault("_plans", {})
        p = plans.get(bid)
        if p is not None:
            return p
        bir, fn = self.blocks[bid]
        p = BlockCallPlan()
        p.stage = stage_name(bid)
        tensors = getattr(fn, "tensors", None) if fn is not None else None
        if tensors is not None:
            by_name = {irn: (var, kind) for var, irn, kind in bir.dev_inputs}
            p.tensors, p.in_vars, p.out_names = tensors, [by_name[n] for n in fn.input_names], list(fn.output_names)
        if bir.host_nodes:
            names = set(bir.host_nodes)
            leaves = {}
            for nd, call in self._host_nodes(bir):
                for a in fx_nodes((nd.args, nd.kwargs)):
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
                p.host.append((nd.name, node_call(nd, call)))
            p.leaves = [(k, s, r) for k, (s, r) in leaves.items()]
            p.wanted = [ref for src, ref in bir.outputs.values() if src == "host"]
        plans[bid] = p
        return p

    # ------------------------------------------------------------------ control
    def _seq(self, items, frames):
        for it in items:
            if not frames:
                return frames
            if isinstance(it, BlockStep):
                for f in frames:
                    self._block(it, f)
            elif isinstance(it, IfStep):
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
            elif isinstance(it, ReturnStep):
                for f in frames:
                    vals = [to_numpy(f.env[nm]) for nm in it.names]
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
