"""Hutchinson per-layer Hessian traces: qdeploy vs PyHessian 0.1 (arXiv 1912.07145; autograd double
backward, one probe at a time), same model, data and probe count, measured in one run.  Ours: the
default estimator for Linear/Conv nets, *per-sample probes* (``estimator="per_sample"``: one
independent Kronecker-Rademacher probe per sample and pass, see
``compiler/quantization/hutchinson_persample.py``) with early stop on the standard error (``--rel-se``,
cap ``--probes`` passes), its blockwise variant and the same pass count without early stop; the
joint estimator (PyHessian's) with ``hvp="autograd"`` (double backward, probe loop, as PyHessian) and
the ``torch.func`` modes (``rev``/``fwd``, vmapped over probe chunks); and the exact traces of
piecewise-linear nets.  The per-sample rows print, per layer, the relative standard error, the
difference to a ``--ref-probes`` PyHessian reference and to the exact traces (``ggn_exact``: these
ReLU nets have Hessian block = Gauss-Newton block), beside PyHessian's own relative standard error at
``--probes`` probes.

Printed: wall time of each and their ratio (PyHessian / ours; team target >= 3x), and per layer the
relative difference of the traces.  Two comparisons:

* independent probes (each library its own Rademacher draws): the difference is statistical; it is
  printed beside the combined standard error;
* the same probes fed to both HVPs: the difference is numerical only (checks the HVP itself).

PyHessian's ``trace()`` gives the total over all parameters; for per-layer traces its own loop is
run with ``pyhessian.utils.hessian_vector_product`` and the products split by layer (what HAWQ
does).  Biases are frozen so both estimate the same weight blocks.  ``tol=-inf`` forces the probe
count in PyHessian (its early stop can fire when a running mean turns negative; TOOLCHAIN.md).

Exact traces (``method="ggn_exact"``): for these piecewise-linear ReLU networks the Hessian block of
the cross-entropy equals its Gauss-Newton block, so Tr(H_ii) is computed exactly from C vjps per
sample (no probes).  Printed: its time (both modes, best of 3 after a warm-up) vs PyHessian's
``trace(maxIter=probes)``, and its per-layer relative difference to PyHessian's per-layer estimate
at ``--probes`` and at ``--ref-probes`` (a long run, near truth), each beside PyHessian's standard
error, so whether a difference is sampling noise can be read off (|diff|/se).

    python benchmarks/hessian_trace.py [--model mlp|cnn|jet] [--probes 200] [--samples 1024] [--ref-probes 2000] [--rel-se 0.02]
"""
import argparse
import time

import numpy as np
import torch
from torch import nn

from qdeploy.compiler.quantization.hessian import ggn_exact_traces, weight_layers
from qdeploy.compiler.quantization.hutchinson import hutchinson_traces


def make(kind):
    torch.manual_seed(0)
    if kind == "jet":
        return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                             nn.Linear(32, 5)), (16,), 5
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)), (64,), 10
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 10)), (1, 8, 8), 10


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mlp", choices=["mlp", "cnn", "jet"])
    ap.add_argument("--probes", type=int, default=200)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=50, help="probes per vmap chunk (ours)")
    ap.add_argument("--ref-probes", type=int, default=2000, help="probes of the long PyHessian reference run")
    ap.add_argument("--rel-se", type=float, default=0.02,
                    help="early stop of ours (per-sample probes): every layer's standard error <= this x |trace|")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        from pyhessian import hessian as PyHessian
        from pyhessian.utils import hessian_vector_product
    except ImportError:
        raise SystemExit("pyhessian is not installed: pip install 'qdeploy[bench]' (or pip install pyhessian)")

    model, shape, k = make(args.model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.samples, *shape, generator=g).abs()
    # labels from a perturbed teacher, so the loss is neither trivial nor random
    y = (model(x) + 0.5 * torch.randn(args.samples, k, generator=g)).argmax(1).detach()
    # a few training steps, so the Hessian is that of a fitted model
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    names = [n for n, _ in weight_layers(model)]
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("weight"))
    crit = nn.CrossEntropyLoss()
    P = args.probes

    # --- ours, both HVP modes (warm-up first: vmap tracing)
    t_modes = {}
    for mode in ("autograd", "rev", "fwd"):
        hutchinson_traces(model, (x, y), max_probes=10, tol=0.0, hvp=mode)
        t0 = time.perf_counter()
        res = hutchinson_traces(model, (x, y), max_probes=P, batch_probes=min(P, args.chunk), tol=0.0, seed=0,
                                hvp=mode)
        t_modes[mode] = time.perf_counter() - t0
        if mode == "autograd":  # the default
            ours = res
    t_ours = t_modes["autograd"]

    # --- ours, per-sample probes (the default estimator), early stop on the standard error; joint
    # row sums and blockwise (t-Hessian diagonal); then the same pass count without early stop
    t_ps, res_ps = {}, {}
    for blk in (False, True):
        hutchinson_traces(model, (x, y), max_probes=2, tol=0.0, estimator="per_sample", blockwise=blk)
        t0 = time.perf_counter()
        res_ps[blk] = hutchinson_traces(model, (x, y), max_probes=P, tol=0.0, rel_se=args.rel_se, seed=0,
                                        estimator="per_sample", blockwise=blk)
        t_ps[blk] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ps_full = hutchinson_traces(model, (x, y), max_probes=P, tol=0.0, seed=0, estimator="per_sample")
    t_ps_full = time.perf_counter() - t0

    # --- PyHessian: its trace() (total), timed; and its loop split per layer
    t0 = time.perf_counter()
    hc = PyHessian(model, crit, data=(x, y), cuda=False)
    total_samples = hc.trace(maxIter=P, tol=float("-inf"))
    t_ph = time.perf_counter() - t0

    def ph_per_layer(probes, seed):
        torch.manual_seed(seed)
        out = {n: [] for n in names}
        for _ in range(probes):
            v = [torch.randint_like(p, high=2) for p in hc.params]
            for vi in v:
                vi[vi == 0] = -1
            Hv = hessian_vector_product(hc.gradsH, hc.params, v)
            for n, vi, hvi in zip(names, v, Hv):
                out[n].append(float((vi * hvi).sum()))
        return out

    per = ph_per_layer(P, 1)
    t0 = time.perf_counter()
    ref = ph_per_layer(args.ref_probes, 3)
    t_ref = time.perf_counter() - t0

    # --- ours, exact (ggn_exact): both modes, warm-up then best of 3
    t_ggn = {}
    for mode in ("outputs", "persample"):
        ggn_exact_traces(model, (x, y), mode=mode)
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            r = ggn_exact_traces(model, (x, y), mode=mode)
            ts.append(time.perf_counter() - t0)
        t_ggn[mode] = min(ts)
        if mode == "outputs":
            exact = r
        else:
            max_mode = max(abs(r.weights[n].trace - exact.weights[n].trace) / abs(exact.weights[n].trace)
                           for n in names)

    # --- the same probes, timed: PyHessian's HVP loop fed exactly the Rademacher vectors our
    # estimator draws (its generator and order), so the per-layer difference is numerical only
    from qdeploy.compiler.quantization.hutchinson import rademacher
    gen = torch.Generator().manual_seed(0)
    chunk = min(P, args.chunk)
    same = {n: [] for n in names}
    t0 = time.perf_counter()
    hc2 = PyHessian(model, crit, data=(x, y), cuda=False)
    done = 0
    while done < P:
        kk = min(chunk, P - done)
        vs = {n: rademacher((kk, *dict(model.named_modules())[n].weight.shape), gen) for n in names}
        for j in range(kk):
            v = [vs[n][j] for n in names]
            Hv = hessian_vector_product(hc2.gradsH, hc2.params, v)
            for n, vi, hvi in zip(names, v, Hv):
                same[n].append(float((vi * hvi).sum()))
        done += kk
    t_same = time.perf_counter() - t0

    # --- same probes through both HVPs (numerical check): our HVP on PyHessian's vectors
    from torch.func import functional_call, grad, jvp
    params = {n: p.detach() for n, p in model.named_parameters()}
    w0 = {f"{n}.weight": params[f"{n}.weight"] for n in names}

    def loss_of(w):
        return crit(functional_call(model, ({**params, **w},), (x,)), y)

    torch.manual_seed(2)
    max_num = 0.0
    for _ in range(5):
        v = [torch.randint_like(p, high=2) * 2.0 - 1 for p in hc.params]
        Hv_ph = hessian_vector_product(hc.gradsH, hc.params, v)
        Hv_us = jvp(grad(loss_of), (w0,), ({f"{n}.weight": vi for n, vi in zip(names, v)},))[1]
        for n, vi, h1 in zip(names, v, Hv_ph):
            a, b = float((vi * h1).sum()), float((vi * Hv_us[f"{n}.weight"]).sum())
            max_num = max(max_num, abs(a - b) / max(abs(a), 1e-12))

    print(f"model {args.model}, {args.samples} samples, {P} Rademacher probes, {args.threads} thread(s)")
    print(f"  ours, double backward, probe loop (hvp='autograd'):   {t_modes['autograd']:.3f} s  (default)")
    print(f"  ours, reverse-over-reverse (vjp of grad, vmap x{chunk}):   {t_modes['rev']:.3f} s")
    print(f"  ours, forward-over-reverse (jvp of grad, vmap x{chunk}):   {t_modes['fwd']:.3f} s  ")
    print(f"  PyHessian hessian(...).trace(maxIter={P}):       {t_ph:.3f} s")
    print(f"  PyHessian HVP loop on our probes (per layer):    {t_same:.3f} s")
    print(f"  time ratio PyHessian trace / ours (autograd, default): {t_ph / t_ours:.2f}x; / ours (rev): "
          f"{t_ph / t_modes['rev']:.2f}x; / ours (fwd): {t_ph / t_modes['fwd']:.2f}x (target >= 3x)")
    wsame = max(abs(ours.weights[n].trace - np.mean(same[n])) / abs(np.mean(same[n])) for n in names)
    print(f"  same probes, timed: PyHessian loop / ours (autograd) {t_same / t_ours:.2f}x; max per-layer relative "
          f"difference of the traces {wsame:.2e} (target < 5%)")
    tot_ours = sum(ours.weights[n].trace for n in names)
    print(f"  total trace: ours {tot_ours:.5g}, PyHessian {np.mean(total_samples):.5g}, "
          f"rel diff {abs(tot_ours - np.mean(total_samples)) / abs(np.mean(total_samples)):.2%}")
    worst = 0.0
    print("  per-layer (independent probes):  layer   ours ± se         PyHessian ± se     rel diff   |diff|/se_comb")
    for n in names:
        a = ours.weights[n]
        s = np.asarray(per[n])
        b, bse = s.mean(), s.std(ddof=1) / np.sqrt(len(s))
        rd = abs(a.trace - b) / abs(b)
        worst = max(worst, rd)
        print(f"  {'':32}{n:>5}   {a.trace:9.4g} ± {a.stderr:<8.2g} {b:9.4g} ± {bse:<8.2g} {rd:8.2%}   "
              f"{abs(a.trace - b) / np.hypot(a.stderr, bse):.2f}")
    print(f"  max per-layer relative difference: {worst:.2%} (target < 5%)")
    print(f"  same probes through both HVPs: max relative difference of v^T Hv {max_num:.2e}")

    print(f"exact traces (method='ggn_exact', piecewise-linear net: Hessian block = Gauss-Newton block; "
          f"no probes), best of 3")
    print(f"  ours ggn_exact, vjps at layer outputs (default): {t_ggn['outputs']:.4f} s")
    print(f"  ours ggn_exact, per-sample jacrev:               {t_ggn['persample']:.4f} s  "
          f"(max rel diff between modes {max_mode:.1e})")
    print(f"  PyHessian hessian(...).trace(maxIter={P}):       {t_ph:.3f} s")
    print(f"  time ratio PyHessian trace({P}) / ours ggn_exact: {t_ph / t_ggn['outputs']:.1f}x (target >= 3x)")
    print(f"  PyHessian per-layer loop, {args.ref_probes} probes (reference): {t_ref:.3f} s")
    print(f"  per layer:  layer   ggn_exact   PyHessian({P}) ± se   rel diff  |d|/se   "
          f"PyHessian({args.ref_probes}) ± se   rel diff  |d|/se")
    w1 = w2 = 0.0
    for n in names:
        e = exact.weights[n].trace
        cols = []
        for smp in (per[n], ref[n]):
            s_ = np.asarray(smp)
            b, bse = s_.mean(), s_.std(ddof=1) / np.sqrt(len(s_))
            cols.append((b, bse, abs(e - b) / abs(b), abs(e - b) / bse))
        w1, w2 = max(w1, cols[0][2]), max(w2, cols[1][2])
        print(f"  {'':10}{n:>5}   {e:9.4g}   {cols[0][0]:9.4g} ± {cols[0][1]:<8.2g} {cols[0][2]:7.2%}  "
              f"{cols[0][3]:5.2f}   {cols[1][0]:9.4g} ± {cols[1][1]:<8.2g} {cols[1][2]:7.2%}  {cols[1][3]:5.2f}")
    print(f"  max per-layer relative difference: vs PyHessian({P}) {w1:.2%}, "
          f"vs PyHessian({args.ref_probes}) {w2:.2%} (target < 5%)")

    print(f"per-sample probes (estimator='per_sample', the default for Linear/Conv nets): one independent "
          f"Kronecker-Rademacher probe per sample and pass; early stop when every layer's se <= {args.rel_se:.0%} "
          f"of its trace (cap {P} passes)")
    for blk, label in ((False, "row sums (default)"), (True, "blockwise")):
        r = res_ps[blk]
        print(f"  ours per-sample, {label:18}: {t_ps[blk]:.3f} s, {r.probes} passes, converged {r.converged}; "
              f"PyHessian trace({P}) / ours = {t_ph / t_ps[blk]:.2f}x (target >= 3x)")
    print(f"  ours per-sample, {P} passes, no early stop: {t_ps_full:.3f} s; PyHessian trace({P}) / ours = "
          f"{t_ph / t_ps_full:.2f}x (the same count of passes; each pass is one probe per sample)")
    print(f"  per layer:  layer   estimate ± se (rel se)              vs PyHessian({args.ref_probes}) rel diff  "
          f"|d|/se_comb   vs ggn_exact rel diff   PyHessian({P}) rel se")
    worst_ref = 0.0
    for blk, label in ((False, "rows"), (True, "block")):
        r = res_ps[blk]
        for n in names:
            a = r.weights[n]
            s_ = np.asarray(ref[n])
            b, bse = s_.mean(), s_.std(ddof=1) / np.sqrt(len(s_))
            p_ = np.asarray(per[n])
            pse = p_.std(ddof=1) / np.sqrt(len(p_)) / abs(p_.mean())
            e = exact.weights[n].trace
            rd = abs(a.trace - b) / abs(b)
            worst_ref = max(worst_ref, rd)
            print(f"  {label:>10}{n:>5}   {a.trace:9.4g} ± {a.stderr:<8.2g} ({a.stderr / abs(a.trace):6.2%})   "
                  f"{rd:14.2%}   {abs(a.trace - b) / np.hypot(a.stderr, bse):10.2f}   {abs(a.trace - e) / abs(e):14.2%}"
                  f"   {pse:14.2%}")
    print(f"  max per-layer relative difference of the early-stopped per-sample estimates vs PyHessian("
          f"{args.ref_probes}): {worst_ref:.2%} (target < 5%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
