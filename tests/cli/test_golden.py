import subprocess
import sys

import numpy as np
import pytest

import qdeploy
from qdeploy.compiler.ir import Graph
from qdeploy.golden import GoldenError, check, record

from tests.conftest import small_mlp


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "qdeploy.cli", *args], capture_output=True, text=True)


def test_golden_record_check_and_tamper(tmp_path, rng):
    g = small_mlp(rng)
    x = np.round(rng.uniform(-1, 1, (40, 16)) * 256) / 256
    out = tmp_path / "art"
    qdeploy.compile(g, "reference", out, golden=x)
    gold = tmp_path / "golden.npz"
    s = record(out, gold)
    assert s["samples"] == 40
    r = check(out, gold)
    assert r.ok and r.mismatches == 0 and r.digest_matches
    ok = _cli("golden", "check", str(out), str(gold))
    assert ok.returncode == 0 and "passed" in ok.stdout
    # change one weight of the compiled artifact (the reference target's "library" is
    # model.json/npz): the check must fail, readably
    art = Graph.load(str(out / "model"))
    doc, arrays = art.to_json()
    key = next(k for k in arrays if k.endswith("_weight"))
    w = arrays[key].copy()
    w[0, 0] = -w[0, 0] - 1 if w[0, 0] >= 0 else -w[0, 0] - 1
    arrays[key] = w
    np.savez(out / "model.npz", **arrays)
    r = check(out, gold)
    assert not r.ok and r.first["output"] == "q1" and r.first["expected_code"] != r.first["actual_code"]
    bad = _cli("golden", "check", str(out), str(gold))
    assert bad.returncode == 1
    assert "FAILED" in bad.stderr and "sample" in bad.stderr and "expected" in bad.stderr and "got" in bad.stderr


def test_golden_check_compares_the_recorded_real_values_and_types(tmp_path, rng):
    """The real values a golden file records are checked too (an edited output_real used to pass),
    and a recorded output type other than the artifact's is refused (the same codes at another
    binary point are other values)."""
    import json
    g = small_mlp(rng)
    x = np.round(rng.uniform(-1, 1, (12, 16)) * 256) / 256
    out = tmp_path / "art"
    qdeploy.compile(g, "reference", out, golden=x)
    gold = tmp_path / "golden.npz"
    record(out, gold)
    with np.load(gold) as z:
        arrays = {k: z[k] for k in z.files}
    o = next(k.split(":", 1)[1] for k in arrays if k.startswith("output_real:"))
    edited = dict(arrays)
    edited[f"output_real:{o}"] = arrays[f"output_real:{o}"].copy()
    edited[f"output_real:{o}"][3].flat[0] += 0.5
    np.savez(tmp_path / "edited.npz", **edited)
    r = check(out, tmp_path / "edited.npz")
    assert not r.ok and r.mismatches == 1 and r.first["sample"] == 3 and r.max_abs_error == 0.5
    meta = json.loads(arrays["__meta__"].tobytes().decode())
    t = meta["outputs"][o]
    meta["outputs"][o] = t.replace("fixed<", "fixed<1") if t.startswith("fixed<") else "float16"
    retyped = dict(arrays, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    np.savez(tmp_path / "retyped.npz", **retyped)
    with pytest.raises(GoldenError, match=f"output {o!r}: golden type"):
        check(out, tmp_path / "retyped.npz")
    assert check(out, gold).ok  # the untouched file still passes
    # a golden file of another model (other digest, other input shape) says so, naming the input
    other = dict(arrays)
    i = next(k for k in arrays if k.startswith("input_codes:"))
    other[i] = arrays[i][:, :8]
    meta2 = dict(json.loads(arrays["__meta__"].tobytes().decode()), graph_digest="0" * 16)
    other["__meta__"] = np.frombuffer(json.dumps(meta2).encode(), dtype=np.uint8)
    np.savez(tmp_path / "other.npz", **other)
    with pytest.raises(GoldenError, match=r"input '.*': golden codes of shape \(12, 8\).*another model"):
        check(out, tmp_path / "other.npz")


def test_golden_tolerance_and_bad_file(tmp_path, rng):
    g = small_mlp(rng)
    out = tmp_path / "art"
    qdeploy.compile(g, "reference", out)
    nogood = tmp_path / "x.npz"
    np.savez(nogood, a=np.zeros(3))
    r = _cli("golden", "check", str(out), str(nogood))
    assert r.returncode == 2 and "not a qdeploy golden file" in r.stderr
    own = _cli("golden", "check", str(out), str(out / "golden.npz"))  # the artifact's own input/reference record
    assert own.returncode == 2 and "artifact's own golden.npz" in own.stderr and "qdeploy golden record" in own.stderr
    assert "Traceback" not in own.stderr and len(own.stderr.strip().splitlines()) == 1
