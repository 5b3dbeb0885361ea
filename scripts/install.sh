#!/usr/bin/env bash
# Installs what opacus_dmaudit needs on a fresh machine: Debian's Fashion-MNIST package (the embedded default data)
# and the Python packages (torch 2.14.1 / torchvision 0.29.1 come from the local disk here). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
if ! $PYTHON -c "import torch, torchvision" 2>/dev/null; then
  $PYTHON -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
# Reinstall when a dependency is missing or `opacus_dmaudit` resolves to another checkout (CI clones elsewhere).
if ! $PYTHON - <<'PY' 2>/dev/null
import pathlib, sys
import opacus, diffusers, lpips, skimage, pywt, tensorboard, pytest  # noqa: F401
import opacus_dmaudit
sys.exit(0 if pathlib.Path(opacus_dmaudit.__file__).resolve().parents[1] == pathlib.Path.cwd().resolve() else 1)
PY
then
  $PYTHON -m pip install -q -e ".[test]"
fi
$PYTHON -c "import opacus_dmaudit, torch; print('opacus_dmaudit ready: torch', torch.__version__)"
