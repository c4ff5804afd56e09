"""The multi-threaded branch of the default TVM schedule, bit-exact.

The default ``tvm-llvm`` schedule (``schedule: auto``) runs a loop nest on TVM's thread pool
only when a call has ``min_parallel_work`` element operations, so the small batches of the
other conformance tests take its serial branch.  Here every conformance case TVM accepts is
merged into one wide graph and compiled with ``min_parallel_work: 0`` (every parallel loop
taken, even at batch 1), then run in fresh processes with ``TVM_NUM_THREADS=1`` and ``=2`` on
seeded full-range inputs; the outputs must equal the reference interpreter's (codes exactly,
float outputs within float32 rounding, see :func:`~tests.conformance.conftest.compare`), and
the process must really have had that many threads.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from qdeploy.compiler import reference as ref

from .conftest import Wide, backend_params, compare, random_feeds
from .test_ops import CASES

RUNNER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tvm
    from qdeploy.backends.tvm import TvmBackend
    run = TvmBackend().load(sys.argv[1])
    for path in sys.argv[2:]:
        out = run(dict(np.load(path)))
        np.savez(path[:-4] + "_out.npz", **out)
    print(json.dumps({"threads": int(tvm.get_global_func("runtime.NumThreads")())}))
""")


@pytest.fixture(scope="module")
def wide_parallel(compiled):
    return Wide("par", CASES, compiled, seed=11, config={"tvm": {"min_parallel_work": 0}})


@pytest.mark.slow  # ~60 s on CI: the wide parallel graph
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("backend", backend_params(("tvm-llvm",)))
def test_parallel_branch_exact(backend, threads, wide_parallel, tmp_path):
    rejected, comp, outs = wide_parallel.get(backend)
    assert set(rejected) == {c.id for c in CASES if backend in c.rejects}
    assert comp.info["schedule"] == "auto" and comp.info["min_parallel_work"] == 0
    paths, wants = [], []
    for batch in (1, 7):
        feeds = random_feeds(comp.graph, np.random.default_rng(300 + batch), batch)
        p = tmp_path / f"feeds_{batch}.npz"
        np.savez(p, **feeds)
        paths.append(str(p))
        wants.append(ref.execute(comp.graph, feeds, codes=True))
    env = dict(os.environ, TVM_NUM_THREADS=str(threads))
    res = subprocess.run([sys.executable, "-c", RUNNER, str(comp.out_dir), *paths], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["threads"] == threads
    bad = []
    for p, want in zip(paths, wants):
        got = dict(np.load(p[:-4] + "_out.npz"))
        bad += compare("parallel", f"wide@{threads}threads", backend, comp.graph, got, want)
    assert not bad, "\n".join(bad[:20])
