#!/usr/bin/env bash
# GPU check: DP-SGD throughput on one GPU, in under 5 minutes on one H100.
#
# Prints images/s for ResNet-9 (GroupNorm) at 256x256, non-private and with Opacus' DP-SGD in its
# grad_sample_mode hooks, ew and ghost, each at the largest physical batch that fits; the DP/non-DP
# throughput ratio; the peak GPU memory of each mode; then the same for the 3D CT model (cnn3d-gn) at 64^3.
# The work is done by benchmarks/gpu_check.py (see its docstring); flags given here go to it, e.g.
#   bash benchmarks/gpu_check.sh --modes non-dp,hooks,ew,ghost,fast --json out.json
#
# The GPU machine has Python 3.12 and torch 2.11 but no network, and lacks opacus, monai (the 3D model),
# nibabel, fairlearn, aif360, dp-accounting, jsonschema and pydicom. They travel as wheels: download them once,
# on a machine with pip and a network, into benchmarks/wheels (git-ignored, about 9 MB), from the repo root:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d benchmarks/wheels \
#     opacus==1.6.0 monai==1.6.1 nibabel==5.4.2 fairlearn==0.15.0 aif360==0.6.1 dp-accounting==0.6.0 \
#     dm-tree==0.1.10 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
#     rpds-py==2026.9.1 pydicom==3.0.2
#
# and carry that folder along (with this workplace's device tool: carry ["benchmarks/wheels"], command
# "bash benchmarks/gpu_check.sh"). This script installs them with pip --no-index --no-deps into a
# private folder when opacus or monai cannot be imported, and runs from the checkout (PYTHONPATH), so
# nothing needs installing on that machine.
#
# On CPU, GPU_CHECK_TINY=1 runs the same code at tiny sizes in seconds (the tests do this).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS="${PRIVAUDIT_WHEELS:-benchmarks/wheels}"

if ! "$PY" -c "import opacus, monai" >/dev/null 2>&1; then
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    SITE="$(mktemp -d "${TMPDIR:-/tmp}/privaudit-site.XXXXXX")"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: opacus or monai is missing and $WHEELS holds no wheels; download them as this script's header says" >&2
    exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

args=()
if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  args=(--device cpu --size 32 --width 8 --size3d 16 --width3d 8 --start 4 --start3d 2 --warmup 1 --steps 2)
fi
if command -v nvidia-smi >/dev/null 2>&1 && [ "${GPU_CHECK_TINY:-0}" != 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
# Flags given on the command line come last, so they win over the tiny defaults.
exec timeout "${GPU_CHECK_TIMEOUT:-290}" "$PY" benchmarks/gpu_check.py "${args[@]}" "$@"
