"""Code generation for the batch-1 path of a dynamic program (DyCL's generated host module).

:class:`Batch1Host` turns the control plan into nested closures once and each block into
generated straight-line Python (``step(env)``), so that a single-sample call does no item
dispatch, no frame routing and no per-sample argument mapping.
"""
from __future__ import annotations

import numpy as np

from ...compiler.errors import QDeployError
from ...compiler.ir.layout import NCHW, layout_of
from .plan import BlockStep, IfStep, ReturnStep
from .values import DevVal, HostVal, as_device, dev_input1, fx_nodes, host1_to_device, to_numpy

__all__ = ["Batch1Host"]


class _NoGen(Exception):
    """A block the batch-1 code generator does not handle (the closure step is used)."""



class Batch1Host:
    """The single-sample path of :class:`~qdeploy.runtime.dynamic.model.DynamicModel` (a mixin).

    Single samples (``n == 1``, the way eager PyTorch runs these models) take a direct path: the
    control graph is turned once into nested closures and each block into generated straight-line
    Python (DyCL's generated host module) that calls the backend's batch-1 entry directly when it
    offers one (``tvm-llvm``: ``run.entry1``), hands TVM tensors from block to block and shares
    torch/numpy inputs zero-copy through DLPack.  Other backends use the same steps through their
    ``load`` callable.  Results and ``last_stats`` equal the routed path's.

    The host class provides ``program``, ``blocks``, ``last_stats``, ``_plan(block id)``,
    ``_host_nodes(block)`` and ``_cond(value, n)``.
    """

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
            if isinstance(it, BlockStep):
                steps.append(self._block_step(it))
            elif isinstance(it, IfStep):
                steps.append(self._if_step(it))
            elif isinstance(it, ReturnStep):
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
                v = to_numpy(env[nm])
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
        ns = {"DevVal": DevVal, "HostVal": HostVal, "_in": dev_input1, "STATS": self.__dict__}
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
                if isinstance(a, dict) or (isinstance(a, tuple) and fx_nodes(a)):
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
                        args.append(host1_to_device(v, kind))
                outs = tensors(args)
                for node, i, kind in out_pos:
                    dev_res[node] = DevVal(None, kind, outs[i])
                stats["last_stats"]["block_calls"] += 1
            elif fn is not None:
                res = fn({irn: as_device(env[var], kind) for var, irn, kind in dev_inputs})
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
