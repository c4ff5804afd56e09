#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: is the tvm-cuda target bit-exact?  Runs, in under 5 minutes,
#   1. the device check (tvm.cuda(0) must exist: else exit 2, nothing is "passed");
#   2. the conformance suite's op cases (test_ops_batch_a/b.py, then test_ops.py: every IR op on
#      tiny models merged into wide graphs, batch 1 and 8) and the bit-width sweep (test_bitwidths.py)
#      for tvm-cuda, against the reference interpreter, code for code (QDEPLOY_GPU=1 adds tvm-cuda to the
#      suite's backends; a case that cannot run FAILS);
#   3. the tvm-cuda backend tests (tests/backends/test_tvm_cuda.py: with a device they compare the
#      GPU run with the reference; the nvcc source check runs where nvcc exists).
# Prints a summary line per step and the conformance ledger (values compared, mismatches).
# Usage: scripts/gpu_check.sh   (from the repository root, after scripts/setup.sh; no network needed)
# Needs NVRTC (pip cuda-python) or nvcc on the GPU machine: TVM compiles the library's embedded CUDA
# source when it is loaded (backends/tvm/cuda.py).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LOG=${LOG:-gpu_check.log}
start=$(date +%s)
echo "== gpu_check: $(date -u +%FT%TZ) on $(hostname)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader
timeout 30 "$PY" - <<'EOF' || { echo "gpu_check: FAILED: no usable CUDA device (see above)"; exit 2; }
import sys
import tvm
dev = tvm.cuda(0)
if not dev.exist:
    print("tvm.cuda(0) does not exist: no GPU visible to TVM"); sys.exit(2)
print(f"device: {dev.device_name}, compute {dev.compute_version}, TVM {tvm.__version__}")
EOF
arch=$("$PY" -c "import tvm; print('sm_' + tvm.cuda(0).compute_version.replace('.', ''))")
echo "== conformance (tvm-cuda vs reference), arch $arch: batch a/b op cases and bit widths"
QDEPLOY_GPU=1 QDEPLOY_CONFORMANCE_LEDGER=gpu_ledger.json timeout 120 "$PY" -m pytest -q -p no:cacheprovider \
  tests/conformance/test_ops_batch_a.py tests/conformance/test_ops_batch_b.py tests/conformance/test_bitwidths.py \
  -k "tvm-cuda" -rf 2>&1 | tee "$LOG" | tail -15
conf=${PIPESTATUS[0]}
# test_ops.py's wide graph (every core op): its tvm-cuda build did not finish in 20 min on the 2-core
# build machine (time spent in TVM's TIR lowering, s_tir/pipeline.py); given its own limit so that a
# timeout (exit 124) is reported as such and the script stays under 5 minutes
echo "== conformance (tvm-cuda vs reference): core op cases (test_ops.py)"
QDEPLOY_GPU=1 QDEPLOY_CONFORMANCE_LEDGER=gpu_ledger_ops.json timeout 90 "$PY" -m pytest -q -p no:cacheprovider \
  tests/conformance/test_ops.py -k "tvm-cuda" -rf 2>&1 | tee -a "$LOG" | tail -15
ops=${PIPESTATUS[0]}
[ "$ops" = 124 ] && echo "test_ops.py: TIMEOUT after 90 s (tvm-cuda build of the core-op wide graph)"
echo "== tvm-cuda backend tests"
timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests/backends/test_tvm_cuda.py -rf 2>&1 | tee -a "$LOG" | tail -8
back=${PIPESTATUS[0]}
"$PY" - <<'EOF'
import json, os
L = [r for f in ("gpu_ledger.json", "gpu_ledger_ops.json") if os.path.exists(f)
     for r in json.load(open(f)) if r["backend"] == "tvm-cuda"]
if L:
    print(f"ledger: {len(L)} comparisons, {sum(r['values'] for r in L)} values, "
          f"{sum(r['mismatches'] for r in L)} mismatches (tvm-cuda vs reference)")
EOF
echo "== summary: conformance exit $conf (batch a/b, bit widths), $ops (core ops), backend tests exit $back, $(( $(date +%s) - start )) s"
[ "$conf" = 0 ] && [ "$ops" = 0 ] && [ "$back" = 0 ] && echo "gpu_check: PASS (bit-exact on $arch)" || { echo "gpu_check: FAIL (see $LOG)"; exit 1; }
