#!/usr/bin/env bash
# Estimator validation in one command (not part of the test run):
#   bash benchmarks/estimates.sh
# FPGA estimate vs published hls4ml synthesis reports (benchmarks/refs/hls4ml_published.csv: jet tagger,
# SVHN CNN io_stream, PYNQ-Z2 CNN Resource), then the
# ASIC estimate vs the ECON-T encoder (../shared/refs/asic_econt.csv); both print side-by-side tables.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" benchmarks/estimate_vs_published.py
echo
"$PY" benchmarks/asic_econt.py
