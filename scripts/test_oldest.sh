#!/usr/bin/env bash
# Runs the test suite against the oldest supported torch, torchvision, opacus and diffusers
# (scripts/oldest-supported.txt), in a virtual environment of its own, so the floors in pyproject.toml stay true.
# Needs what scripts/install.sh installs from Debian (the Fashion-MNIST package). About 2 min to install (torch 2.6
# is a CUDA build from PyPI, about 3 GB in the venv) and 6 to 9 min of tests on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/opacus-dmaudit-oldest}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -qq -c scripts/oldest-supported.txt torch torchvision
"$VENV/bin/python" -m pip install -qq -c scripts/oldest-supported.txt -e ".[test]"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as metadata
import pathlib
pins = dict(line.split("==") for line in pathlib.Path("scripts/oldest-supported.txt").read_text().splitlines()
            if line and not line.startswith("#"))
found = {name: metadata.version(name).split("+")[0] for name in pins}
assert found == pins, f"the oldest-supported environment drifted: {found} != {pins}"
print("oldest supported:", ", ".join(f"{name} {version}" for name, version in found.items()))
PY
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests
