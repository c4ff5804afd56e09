"""QAT fan-out speed: `qdeploy search` on the digits MLP recipe with its (allocation x seed) fine-tunes
run serially in one process (``workers=1``, the reference) vs on 2 local worker processes
(``workers=2``), measured in the same run, interleaved (the order alternates each round), best of
``--rounds``, with the machine load (``uptime``) printed before each run.  Also checks that both give
identical allocations, per-seed accuracies, per-sample correctness and QONNX bytes.
Team target: 2 workers >= 1.6x faster than serial on a 2-core machine.

    python benchmarks/search_workers.py [--rounds 2] [--seeds 5] [--epochs 25] [--model mlp|cnn]

Each search runs in a fresh Python process, as ``qdeploy search`` does: both modes pay their own
start-up (serial: this process imports torch, Brevitas and the ONNX exporter once; 2 workers: each
worker imports them too, while the parent trains the float model and computes the traces).  Running
them all in this process would let the serial searches after the first reuse a warm process, which no
user gets.

Threads: every QAT job runs with one torch intra-op thread (``fanout_jobs.JOB_THREADS``), serial or
in a worker (workers also get ``OMP_NUM_THREADS=MKL_NUM_THREADS=1``), so the results cannot depend on
the engine; serial therefore uses one core for the QAT, 2 workers use two.  (With 2 threads a digits
fine-tune gave the same weights here but ran about 5x slower on the shared 2-core machine: the ops
are too small to split.)  The rest of the search (float training, traces, ILPs, report) runs in the
parent with torch's defaults in both modes.

Default size: 3 BOPs budgets (uniform 3, 4, 5 bits) x (Hessian + uniform allocation) x 5 seeds (as
in the MNIST-1D comparison of issue 17), 25 QAT epochs: 30 jobs (fewer if allocations coincide) of
about 4 s of CPU each (6 s with the QONNX export of seed 0), about 125 s serial.  Smaller searches
make the part that does not fan out too large a share: measured on the loaded 2-core machine, the
serial process spends 15-21 s outside the jobs (imports, float training, traces, ILPs, report), each
worker about 8 s of CPU starting up, and with the recipe's 20 epochs x 3 seeds (18 jobs, about 80 s)
that bounds the search's ratio near 1.6x.  About 7 minutes for 2 rounds on 2 idle cores.  Printed per
run: the process's wall time (the search as a user waits for it), the search's own ``seconds`` (from
the recipe on), and its QAT part (``qat_fanout.seconds``); then the best of each, the ratios
serial / 2 workers, and the serial search's non-QAT seconds with the best ratio they allow (Amdahl:
(S + Q) / (S + Q / 2)).  On a busy machine the ratios are depressed: the jobs' CPU / wall below 1
says they waited for a core.  Also printed: the CPU seconds of each run (the search process and its
workers), and from them the ratio 2 idle cores would allow at best (2 x serial CPU / 2-worker CPU): the
extra work of the workers (their start-up) shows there, whatever the load.  On a machine shared with
other logins Linux's autogroup scheduler (``/proc/sys/kernel/sched_autogroup_enabled``) gives each
session an equal CPU share and the two workers share this session's: there the measured ratio says
little (on the loaded 2-core machine a lone process got CPU / wall 1.0 and each of two got 0.5).
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qdeploy.compiler.quantization.search_report import engine_fingerprint

ROOT = Path(__file__).resolve().parents[1]

RUNNER = """
import json, sys
from qdeploy.compiler.quantization.search import run_search
from qdeploy.compiler.quantization.search_budget import parse_search_budget
a = json.loads(sys.argv[1])
run_search(a["recipe"], a["out"], budgets=[parse_search_budget(b) for b in a["budgets"]], w_bits=(2, 3, 4, 5, 6, 8),
           qat_seeds=a["seeds"], qat_epochs=a["epochs"], progress=False, workers=a["workers"])
"""


def load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "uptime not available"


def run_once(args, budgets, out: Path, workers: int):
    spec = {"recipe": f"{ROOT / 'examples/digits/search_recipe.py'}:recipe_{args.model}", "out": str(out),
            "budgets": budgets, "seeds": args.seeds, "epochs": args.epochs, "workers": workers}
    t0, c0 = time.perf_counter(), cpu_children()
    p = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(spec)], cwd=ROOT, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, cpu_children() - c0
    if p.returncode != 0:
        sys.exit(f"search with workers={workers} failed:\n{p.stderr[-3000:]}")
    rep = json.loads((out / "search_report.json").read_text())
    return wall, cpu, rep


def cpu_children() -> float:
    """CPU seconds (user + system) of the finished child processes and theirs (the search process
    waits for its workers, so they count)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=5, help="QAT seeds per allocation")
    ap.add_argument("--epochs", type=int, default=25, help="QAT epochs per job")
    ap.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    ap.add_argument("--budgets", default="bops=uniform:3,bops=uniform:4,bops=uniform:5",
                    help="comma-separated budget points (each kind=value)")
    args = ap.parse_args(argv)
    budgets = args.budgets.split(",")
    keys = ("process", "search", "qat", "cpu", "non_qat")
    t = {w: {k: [] for k in keys} for w in (1, 2)}
    results, jobs = {}, set()
    with tempfile.TemporaryDirectory() as d:
        for rnd in range(args.rounds):
            for w in (1, 2) if rnd % 2 == 0 else (2, 1):  # interleaved, alternating order
                print(f"round {rnd} workers={w}: load {load()}", flush=True)
                out = Path(d) / f"r{rnd}w{w}"
                wall, cpu, rep = run_once(args, budgets, out, w)
                fo = rep["qat_fanout"]
                for k, v in zip(keys, (wall, rep["seconds"], fo["seconds"], cpu, rep["seconds"] - fo["seconds"])):
                    t[w][k].append(v)
                jobs.add(fo["jobs"])
                results.setdefault(w, []).append(engine_fingerprint(out, rep))
                print(f"  process {wall:.1f} s (CPU of it and its workers {cpu:.1f} s), search {rep['seconds']:.1f} s, "
                      f"QAT {fo['seconds']:.1f} s ({fo['jobs']} jobs, engine {fo['engine']}, {fo['workers']} "
                      f"worker(s), {len(fo['retried'])} retried); jobs' CPU {fo['job_cpu_seconds']:.1f} s, jobs' "
                      f"wall {fo['job_seconds']:.1f} s (CPU / wall {fo['job_cpu_seconds'] / fo['job_seconds']:.2f}: "
                      "below 1, the jobs waited for a core)", flush=True)
    first = results[1][0]
    same = all(r == first for w in (1, 2) for r in results[w])
    best = {w: {k: min(v) for k, v in t[w].items()} for w in (1, 2)}
    s_non_qat = best[1]["non_qat"]
    q = best[1]["qat"]
    print(f"digits {args.model}, {len(budgets)} budgets x {args.seeds} seeds = {'/'.join(map(str, sorted(jobs)))} QAT "
          f"jobs of {args.epochs} epochs, one torch thread per job in both modes; best of {args.rounds}:")
    for w, label in ((1, "serial   "), (2, "2 workers")):
        print(f"  {label}: process {best[w]['process']:.1f} s, search {best[w]['search']:.1f} s, QAT part "
              f"{best[w]['qat']:.1f} s")
    print(f"  ratio serial / 2 workers: whole process {best[1]['process'] / best[2]['process']:.2f}x, search "
          f"{best[1]['search'] / best[2]['search']:.2f}x, QAT part {best[1]['qat'] / best[2]['qat']:.2f}x "
          f"(target >= 1.6x)")
    print(f"  serial search outside the QAT fan-out (float training, traces, ILPs, report; least of the runs): "
          f"{s_non_qat:.1f} s, 2 workers {best[2]['non_qat']:.1f} s (with the workers' start-up); with it serial "
          "the search's ratio is at most "
          f"{(s_non_qat + q) / (s_non_qat + q / 2):.2f}x")
    print(f"  CPU seconds of all processes (least of the runs): serial {best[1]['cpu']:.1f} s, 2 workers "
          f"{best[2]['cpu']:.1f} s; on 2 idle cores the 2-worker process can be at most "
          f"{2 * best[1]['cpu'] / best[2]['cpu']:.2f}x faster than serial (both cores busy all the time), if serial's "
          "process uses one core throughout")
    print(f"  identical allocations, accuracies, per-sample correctness and QONNX in all {2 * args.rounds} runs: "
          f"{same}")
    print(f"  load after: {load()}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
