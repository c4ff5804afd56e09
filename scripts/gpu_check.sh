#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: is the tvm-cuda target bit-exact?  Runs, in under 5 minutes,
#   1. the device check (tvm.cuda(0) must exist: else exit 2, nothing is "passed");
#   2. the conformance suite's op cases (tests/conformance/test_ops.py, every IR op on tiny models
#      merged into one wide graph, batch 1 and 8) and the bit-width sweep (test_bitwidths.py) for
#      tvm-cuda, against the reference interpreter, code for code (QDEPLOY_GPU=1 adds tvm-cuda to the
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
timeout 120 "$PY" - <<'EOF' || { echo "gpu_check: FAILED: no usable CUDA device (see above)"; exit 2; }
import sys
import tvm
dev = tvm.cuda(0)
if not dev.exist:
    print("tvm.cuda(0) does not exist: no GPU visible to TVM"); sys.exit(2)
print(f"device: {dev.device_name}, compute {dev.compute_version}, TVM {tvm.__version__}")
EOF
arch=$("$PY" -c "import tvm; print('sm_' + tvm.cuda(0).compute_version.replace('.', ''))")
echo "== conformance (tvm-cuda vs reference), arch $arch"
QDEPLOY_GPU=1 QDEPLOY_CONFORMANCE_LEDGER=gpu_ledger.json timeout 240 "$PY" -m pytest -q -p no:cacheprovider \
  tests/conformance/test_ops.py tests/conformance/test_bitwidths.py -k "tvm-cuda" -rf 2>&1 | tee "$LOG" | tail -25
conf=${PIPESTATUS[0]}
echo "== tvm-cuda backend tests"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/backends/test_tvm_cuda.py -rf 2>&1 | tee -a "$LOG" | tail -8
back=${PIPESTATUS[0]}
"$PY" - <<'EOF'
import json, os
if os.path.exists("gpu_ledger.json"):
    L = [r for r in json.load(open("gpu_ledger.json")) if r["backend"] == "tvm-cuda"]
    print(f"ledger: {len(L)} comparisons, {sum(r['values'] for r in L)} values, "
          f"{sum(r['mismatches'] for r in L)} mismatches (tvm-cuda vs reference)")
EOF
echo "== summary: conformance exit $conf, backend tests exit $back, $(( $(date +%s) - start )) s"
[ "$conf" = 0 ] && [ "$back" = 0 ] && echo "gpu_check: PASS (bit-exact on $arch)" || { echo "gpu_check: FAIL (see $LOG)"; exit 1; }
