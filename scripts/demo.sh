#!/usr/bin/env bash
# The main job on the bundled example: install into .venv, train a Brevitas QAT MLP and CNN on
# scikit-learn's handwritten digits, compile both to hls4ml (C simulation) and TVM (llvm), and
# print the accuracy / exactness table.  Artifacts go to runs/digits/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/digits/run.py --out runs/digits "$@"
