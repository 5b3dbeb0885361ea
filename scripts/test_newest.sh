#!/usr/bin/env bash
# Runs the test suite against the newest releases that pyproject.toml admits, as a fresh `pip install` from PyPI
# resolves them today, in a virtual environment of its own per Python, so that a new torch, opacus or diffusers
# release that breaks this package shows here before a user meets it. NEWEST_PYTHON picks the interpreter (say,
# NEWEST_PYTHON=~/.pyenv/versions/3.13.0/bin/python). Not part of CI: torch from PyPI is a CUDA build (about 6 GB in
# the venv, 4 min to fetch here), and the tests take 7 to 8 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${NEWEST_PYTHON:-python3}
VENV=${VENV:-/tmp/opacus-dmaudit-newest-$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# No pip configuration: this project's machines cap torch at the release on their disk (/etc/xdg/pip), and a user
# who installs from PyPI has no such cap.
export PIP_CONFIG_FILE=/dev/null
"$VENV/bin/python" -m pip install -qq --upgrade pip
"$VENV/bin/python" -m pip install -qq --upgrade --upgrade-strategy eager -e ".[test]"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as metadata
import platform
names = ["torch", "torchvision", "opacus", "diffusers", "lpips", "scikit-image", "tensorboard", "numpy"]
print(f"newest releases on Python {platform.python_version()}:",
      ", ".join(f"{name} {metadata.version(name)}" for name in names))
PY
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests
