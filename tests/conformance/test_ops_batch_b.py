"""hls4ml ``io_stream`` conformance of the batch-B cases (:data:`.cases_batch_b.STREAM_CASES`, some
of them cases of :data:`.test_ops.CASES`): one more wide build; each case is bit-exact against the
reference, or refused with an ``UnsupportedError`` naming one of its nodes where STREAM_CASES says
so.  The C simulation must also not report a stream left with unread data (``hls_stream.h`` prints
"contains leftover data" on stdout when a layer reads less than its producer wrote, the known
io_stream Transpose problem)."""
from __future__ import annotations

import numpy as np
import pytest

from qdeploy.compiler import reference as ref
from qdeploy.compiler.errors import UnsupportedError

from .cases_batch_b import STREAM_CASES
from .conftest import Wide, backend_params, compare, random_feeds
from .test_ops import BY_ID

STREAM_CONFIG = {"hls4ml": {"io_type": "io_stream"}}


@pytest.fixture(scope="module")
def stream_run():
    """(rejected, compiled, outputs by case, got, want, printed stdout) of the io_stream wide build."""
    return {}


def _run(compiled, cache, capfd):
    if not cache:
        wide = Wide("ops_stream", [BY_ID[c] for c in STREAM_CASES], compiled, seed=7, config=STREAM_CONFIG)
        rejected, comp, outs = wide.get("hls4ml")
        feeds = random_feeds(comp.graph, np.random.default_rng(108), 8)
        capfd.readouterr()
        got = comp(feeds)
        printed = capfd.readouterr().out
        cache["r"] = (rejected, comp, outs, got, ref.execute(comp.graph, feeds, codes=True), printed)
    return cache["r"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", backend_params(("hls4ml",)))
@pytest.mark.parametrize("case", list(STREAM_CASES))
def test_op_exact_io_stream(case, backend, compiled, stream_run, capfd):
    rejected, comp, outs, got, want, printed = _run(compiled, stream_run, capfd)
    assert "leftover" not in printed, printed[-2000:]
    if case in rejected:
        err = rejected[case]
        assert not STREAM_CASES[case], f"io_stream unexpectedly rejects {case}: {err}"
        assert isinstance(err, UnsupportedError) and err.node and err.node.startswith(f"{case}__"), err
        return
    assert STREAM_CASES[case], f"io_stream now compiles {case}: mark it exact in STREAM_CASES"
    bad = compare("ops-stream", case, "hls4ml-stream", comp.graph, got, want, outputs=outs[case])
    assert not bad, "\n".join(bad)
