"""The batch-A conformance cases (:data:`.cases_batch_a.CASES_A`) on every backend, hls4ml in both
io_parallel and io_stream: reference == TVM == hls4ml C simulation, code for code; a case a backend
rejects must be listed in ``Case.rejects`` and refused with an ``UnsupportedError`` naming one of
its nodes."""
from __future__ import annotations

import numpy as np
import pytest

from qdeploy.compiler import reference as ref
from qdeploy.compiler.errors import UnsupportedError

from .cases_batch_a import CASES_A
from .conftest import Wide, backend_params, compare, random_feeds

CONFIGS = {"reference": None, "tvm-llvm": None, "hls4ml": {"hls4ml": {"io_type": "io_parallel"}},
           "hls4ml-stream": {"hls4ml": {"io_type": "io_stream"}}}
#: cases hls4ml's io_stream refuses on top of ``Case.rejects``
STREAM_REJECTS: set = set()


@pytest.fixture(scope="module")
def wides(compiled):
    return {k: Wide(f"opsA_{k}".replace("-", "_"), CASES_A, compiled, seed=11, config=cfg)
            for k, cfg in CONFIGS.items()}


@pytest.fixture(scope="module")
def runs():
    return {}


def _params():
    out = []
    for p in backend_params():
        out.append(p)
        if p.values[0] == "hls4ml":
            out.append(pytest.param("hls4ml-stream", id="hls4ml-stream", marks=p.marks))
    return out


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("target", _params())
def test_batch_a_exact(target, wides, runs):
    backend = target.replace("-stream", "")
    rejected, comp, outs = wides[target].get(backend)
    feeds = random_feeds(comp.graph, np.random.default_rng(5), 8)
    got, want = comp(feeds), ref.execute(comp.graph, feeds, codes=True)
    expect_rej = {c.id for c in CASES_A if backend in c.rejects and backend != "reference"}
    if target == "hls4ml-stream":
        expect_rej |= STREAM_REJECTS
    assert set(rejected) == expect_rej, {k: str(v) for k, v in rejected.items()}
    for cid, err in rejected.items():
        assert isinstance(err, UnsupportedError) and err.node and err.node.startswith(f"{cid}__"), err
    bad = []
    for cid, o in outs.items():
        bad += compare("opsA", cid, target, comp.graph, got, want, outputs=o)
    assert not bad, "\n".join(bad)
