#!/usr/bin/env bash
# The prepared GPU run of issue #13 (see benchmarks/gpu_check.py):
#   bash benchmarks/gpu_check.sh OUTDIR [--photos DIR] [--no-compile] [--budget-s S]
#   bash benchmarks/gpu_check.sh OUTDIR --smoke      # the same code on the CPU, < 2 minutes
# Needs only python with torch + torchvision and this repository (no network, nothing installed).
set -euo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash benchmarks/gpu_check.sh OUTDIR [--smoke] [--photos DIR] [--no-compile] [--budget-s S]" >&2
  exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
cd "$REPO"
exec "$PYTHON" benchmarks/gpu_check.py "$@"
