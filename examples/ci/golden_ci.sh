#!/usr/bin/env bash
# A user's CI job with qdeploy: compile the model for the deployment target, then check the
# compiled artifact against the golden file committed next to the model.
#
#   MODEL=models/net.onnx TARGET=hls4ml GOLDEN=golden/net.npz INPUTS=data/x.npy bash golden_ci.sh
#
# Variables (all optional except where noted):
#   MODEL    .onnx file or module:function               (default: the jsc-qkeras-3layer realcase)
#   TARGET   reference | hls4ml | tvm-llvm               (default: tvm-llvm)
#   GOLDEN   committed golden .npz                        (default: examples/ci/golden/<model>.golden.npz)
#   INPUTS   .npy inputs, batch first, used for the compile's exactness check and for RECORD=1
#   CONFIG   qdeploy YAML config                          (default: examples/ci/qdeploy.yaml)
#   OUT      artifact directory, replaced on every run    (default: build/qdeploy-<target>)
#   QDEPLOY  the qdeploy command                          (default: qdeploy on PATH)
#   INSTALL  a pip requirement to install first, e.g. "qdeploy==0.1.0" or "-e ." (default: none)
#   RECORD   1: (re)write GOLDEN from the model instead of checking (after an intended change;
#            review and commit the new file)
#   SKIP_COMPILE  1: only check the artifact already in OUT (e.g. one a build job produced)
# Exit status: 0 the artifact matches the golden file bit for bit, 1 it does not, 2 bad input.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REALCASE="${REALCASE:-${QDEPLOY_SHARED:-$HERE/../../../shared}/realcases/jsc-qkeras-3layer}"
if [ -z "${MODEL:-}" ] && [ ! -f "$REALCASE/qkeras_jettagging.onnx" ]; then
  echo "error: the default model (the jsc-qkeras-3layer realcase) is not at $REALCASE: set MODEL=your.onnx, or QDEPLOY_SHARED=/path/to/shared" >&2
  exit 2
fi
MODEL="${MODEL:-$REALCASE/qkeras_jettagging.onnx}"
INPUTS="${INPUTS-$REALCASE/synthetic_input_uniform_pm1_64x16.npy}"
TARGET="${TARGET:-tvm-llvm}"
stem="$(basename "${MODEL%.onnx}")"; stem="${stem//[:\/]/_}"
GOLDEN="${GOLDEN:-$HERE/golden/$stem.golden.npz}"
CONFIG="${CONFIG-$HERE/qdeploy.yaml}"
OUT="${OUT:-build/qdeploy-$TARGET}"
QDEPLOY="${QDEPLOY:-qdeploy}"
RECORD="${RECORD:-0}"

if [[ -n "${INSTALL:-}" ]]; then
    echo "== installing $INSTALL"
    python -m pip install --quiet $INSTALL
fi

cfg=(); [[ -n "$CONFIG" ]] && cfg=(--config "$CONFIG")
inp=(); [[ -n "$INPUTS" ]] && inp=(--input "$INPUTS")

if [[ "$RECORD" == 1 ]]; then
    echo "== recording $GOLDEN from $MODEL"
    $QDEPLOY golden record "$MODEL" -o "$GOLDEN" "${inp[@]}" "${cfg[@]}"
    exit 0
fi
if [[ ! -f "$GOLDEN" ]]; then
    echo "error: golden file $GOLDEN not found (run once with RECORD=1 and commit it)" >&2
    exit 2
fi

if [[ "${SKIP_COMPILE:-0}" != 1 ]]; then
    echo "== compiling $MODEL for $TARGET -> $OUT"
    gold=(); [[ -n "$INPUTS" ]] && gold=(--golden "$INPUTS")
    $QDEPLOY compile "$MODEL" --target "$TARGET" -o "$OUT" --force "${cfg[@]}" "${gold[@]}"
fi

echo "== golden check $OUT against $GOLDEN"
$QDEPLOY golden check "$OUT" "$GOLDEN"
