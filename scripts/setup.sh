#!/usr/bin/env bash
# Create ./.venv with the pinned torch/torchvision pair, then install cifar-dist (editable) with extras.
# Usage: bash scripts/setup.sh [EXTRAS]
#   EXTRAS default: $CIFAR_DIST_EXTRAS, else dev,wandb,tensorboard,compress,tune,deepspeed (what the tests use);
#   $CIFAR_DIST_ADD_EXTRAS is appended (CI adds ffcv once its system libraries are installed).
# torch and torchvision are installed together in an --isolated pip call: on machines whose pip is
# configured with a local CPU-only torch wheel, that wheel cannot be paired with the registry's
# torchvision (the registry has no CPU torchvision; its CUDA pair runs on CPU too). Every later install is constrained to the same pair.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-${CIFAR_DIST_EXTRAS:-dev,wandb,tensorboard,compress,tune,deepspeed}}
if [ -n "${CIFAR_DIST_ADD_EXTRAS:-}" ]; then EXTRAS=$EXTRAS,$CIFAR_DIST_ADD_EXTRAS; fi
# DeepSpeed ships as an sdist; with DS_BUILD_OPS=0 no op is compiled at install (none is needed:
# cifar-dist uses torch optimisers and skips the shm_comm build, docs/deepspeed.md).
export DS_BUILD_OPS=0
[ -x .venv/bin/python ] || "$PY" -m venv .venv
want='import torch, torchvision; assert torch.__version__.split("+")[0] == "2.13.0"; assert torchvision.__version__.split("+")[0] == "0.28.0"'
if ! .venv/bin/python -c "$want" 2>/dev/null; then
  echo "setup: installing torch 2.13.0 + torchvision 0.28.0 (a few GB, once)"
  .venv/bin/pip install --isolated --quiet --disable-pip-version-check -c constraints.txt torch torchvision numpy
fi
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[${EXTRAS}]"
echo "setup: ready (.venv/bin/cifar-dist)"
