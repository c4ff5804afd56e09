#!/usr/bin/env bash
# Estimator validation in one command (not part of the test run):
#   bash benchmarks/estimates.sh
# FPGA estimate vs the published hls4ml jet tagger (../shared/refs/fpga_jet_tagger_vu9p.csv), then the
# ASIC estimate vs the ECON-T encoder (../shared/refs/asic_econt.csv); both print side-by-side tables.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" benchmarks/estimate_vs_published.py
echo
"$PY" benchmarks/asic_econt.py
