#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the default test suite.  Extra arguments go to pytest
# (e.g. `bash scripts/test.sh -m slow` for the long cases).
set -euo pipefail
cd "$(dirname "$0")/.."
# the default suite also checks the aarch64 cross build (Debian's cross g++, installed by apt when
# missing) and compiles the tvm-cuda source with nvcc (PyPI's when none is on PATH); set either
# variable to "" to skip the install (those tests then fail naming what is missing)
# the Ray extra (pip install qdeploy[ray]) too, so the QAT fan-out's Ray test runs (QDEPLOY_RAY= skips it)
export QDEPLOY_CROSS="${QDEPLOY_CROSS-aarch64}" QDEPLOY_CUDA="${QDEPLOY_CUDA-1}" QDEPLOY_RAY="${QDEPLOY_RAY-1}"
bash scripts/setup.sh
# one pytest worker per core (pytest-xdist), each test file on one worker (its module fixtures are
# built once); QDEPLOY_TEST_JOBS=0 runs in this process, serially
exec .venv/bin/python -m pytest -q -n "${QDEPLOY_TEST_JOBS:-auto}" --dist loadfile --durations=25 "$@"
