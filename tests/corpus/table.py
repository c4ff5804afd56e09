"""Print the corpus table: every model x target outcome (exact / clear error / FAIL), a family x
target summary and the exact-vs-source rate per target.

    .venv/bin/python -m tests.corpus.table                       # all models, all targets
    .venv/bin/python -m tests.corpus.table -t reference,tvm-llvm  # some targets
    .venv/bin/python -m tests.corpus.table -k pot_ --json out.json

Markdown on stdout (what ``docs/corpus.md`` shows); progress on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

from .registry import CORPUS
from .runner import ERROR, EXACT, FAIL, TARGETS, Outcome, run_one

SHORT = {EXACT: "exact", ERROR: "clear error", FAIL: "**FAIL**"}


def run_matrix(names, targets, progress=None) -> dict[tuple[str, str], Outcome]:
    """``{(model, target): Outcome}`` for every pair (see :func:`tests.corpus.runner.run_one`)."""
    res = {}
    for n in names:
        for t in targets:
            res[n, t] = o = run_one(n, t)
            if progress:
                progress(f"{n:34s} {t:9s} {o.kind:5s} {o.seconds:6.1f}s {o.detail[:160]}")
    return res


def render(res: dict[tuple[str, str], Outcome], names, targets) -> str:
    """The markdown tables: per model, per family, the rates, and every non-exact message."""
    fam = {e.name: e.family for e in CORPUS}
    tags = {e.name: ", ".join(t for t in e.tags[1:]) for e in CORPUS}
    L = ["## Per model", "", "| model | family | tags | " + " | ".join(targets) + " |",
         "|---|---|---|" + "---|" * len(targets)]
    for n in names:
        L.append(f"| {n} | {fam[n]} | {tags[n]} | " + " | ".join(SHORT[res[n, t].kind] for t in targets) + " |")
    L += ["", "## Family x target (exact / clear error / FAIL)", "",
          "| family | models | " + " | ".join(targets) + " |", "|---|---|" + "---|" * len(targets)]
    fams = list(dict.fromkeys(fam[n] for n in names))
    for f in fams:
        ms = [n for n in names if fam[n] == f]
        cells = []
        for t in targets:
            c = defaultdict(int)
            for n in ms:
                c[res[n, t].kind] += 1
            cells.append(f"{c[EXACT]} / {c[ERROR]} / {c[FAIL]}")
        L.append(f"| {f} | {len(ms)} | " + " | ".join(cells) + " |")
    L += ["", "## Exact vs source, per target", "", "| target | exact | clear error | FAIL | exact rate |",
          "|---|---|---|---|---|"]
    for t in targets:
        ks = [res[n, t].kind for n in names]
        L.append(f"| {t} | {ks.count(EXACT)} | {ks.count(ERROR)} | {ks.count(FAIL)} | "
                 f"{ks.count(EXACT) / max(1, len(ks)):.0%} |")
    fails = [(n, t) for n in names for t in targets if res[n, t].kind == FAIL]
    L += ["", "## FAIL rows (first error line)", ""]
    L += [f"- `{n}` on {t}: {res[n, t].detail}" for n, t in fails] or ["none"]
    errs = defaultdict(list)
    for n in names:
        for t in targets:
            if res[n, t].kind == ERROR:
                errs[res[n, t].detail].append(f"{n}/{t}")
    L += ["", "## Clear errors (message: models)", ""]
    for msg, who in errs.items():
        L.append(f"- {msg} -- {', '.join(who[:6])}{' ...' if len(who) > 6 else ''} ({len(who)})")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-t", "--targets", default=",".join(TARGETS))
    ap.add_argument("-k", "--match", default="", help="only models whose name contains this")
    ap.add_argument("--json", help="also write the outcomes as JSON here")
    a = ap.parse_args(argv)
    targets = [t for t in a.targets.split(",") if t]
    names = [e.name for e in CORPUS if a.match in e.name]
    t0 = time.perf_counter()
    res = run_matrix(names, targets, progress=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"{len(names)} models x {len(targets)} targets, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(render(res, names, targets))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({f"{n}|{t}": vars(o) for (n, t), o in res.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
