#!/usr/bin/env bash
# Create .venv and install qdeploy with everything it needs (CPU torch first: a plain torch
# requirement would pull a multi-GB CUDA build).  Idempotent: a second run only re-checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.qdeploy-installed
# QDEPLOY_RAY=1 also installs the Ray extra (QAT fan-out on Ray; scripts/test.sh sets it so CI runs the Ray tests)
# tune: meta-schedule tuning of tvm-llvm libraries (tvm.tune, --tune)
extras="test,tune${QDEPLOY_RAY:+,ray}"
want=$( (cat pyproject.toml setup.py scripts/setup.sh; echo "$extras") | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[$extras]"
  echo "$want" > "$stamp"
fi

# Optional toolchains, only where asked (environment variables):
#   QDEPLOY_CROSS=aarch64  Debian's aarch64 cross compiler and qemu-user (tvm-llvm with
#                          tvm.mtriple aarch64-linux-gnu; the qemu bit-exactness test)
#   QDEPLOY_CUDA=1         NVIDIA's nvcc from PyPI (the tvm-cuda source check) when no nvcc is on PATH:
#                          the wheels this machine's /usr/local/cuda-13.0 was assembled from
#                          (nvcc lands in .venv/lib/python3*/site-packages/nvidia/cu13/bin)
if [ -n "${QDEPLOY_CROSS:-}" ]; then
  case "$QDEPLOY_CROSS" in
    aarch64) pkgs="g++-aarch64-linux-gnu qemu-user" ;;
    *) echo "QDEPLOY_CROSS=$QDEPLOY_CROSS: only aarch64 is supported" >&2; exit 2 ;;
  esac
  if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    command -v apt-get >/dev/null || { echo "QDEPLOY_CROSS: apt-get not found; install $pkgs by hand" >&2; exit 2; }
    $SUDO apt-get update -q && $SUDO apt-get install -y -q $pkgs
  fi
fi
if [ -n "${QDEPLOY_CUDA:-}" ] && ! command -v nvcc >/dev/null; then
  .venv/bin/python -m pip install -q "nvidia-cuda-nvcc>=13,<14" "nvidia-cuda-crt>=13,<14" \
    "nvidia-cuda-runtime>=13,<14" "nvidia-cuda-cccl>=13,<14" "nvidia-nvvm>=13,<14"
fi
