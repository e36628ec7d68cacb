#!/usr/bin/env bash
# Installs everything mmseg_gate needs into the project-local virtual environment .venv.
# Idempotent: a second run checks each step and returns in seconds.
# Versions: ../shared/DESIGN.md section 4 (verified together on a 2-core CPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GATE_VENV:-.venv}
PY=${GATE_PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
pip_() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
have() { "$VENV/bin/python" - "$@" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    if version(name) != want:
        sys.exit(1)
PYEOF
}

# Build tools first: mmcv's build and mmengine's `mmseg::` config lookup need pkg_resources,
# which setuptools 81+ dropped.
have setuptools==80.9.0 || pip_ "setuptools==80.9.0" wheel ninja

# PyPI's torch (not the local +cpu file, beside which torchvision does not import).
# torch 2.14 needs C++20 headers, which mmcv 2.1.0's build cannot compile.
if ! have torch==2.13.0 torchvision==0.28.0 || "$VENV/bin/python" -c "import torch,sys; sys.exit('+cpu' not in torch.__version__)"; then
  echo "[install] torch 2.13.0 + torchvision 0.28.0 (several GB, about a minute)"
  pip_ "torch==2.13.0,!=2.13.0+cpu" "torchvision==0.28.0"
fi

# mmcv 2.1.0 with its compiled ops (mmseg imports mmcv.ops). A source build: about 12 minutes
# on 2 cores the first time; pip caches the wheel, so later installs take seconds.
if ! "$VENV/bin/python" -c "import mmcv.ops" >/dev/null 2>&1; then
  echo "[install] mmcv 2.1.0 from source (first time about 12 minutes on 2 cores)"
  MAX_JOBS=${MAX_JOBS:-2} pip_ --no-build-isolation "mmcv==2.1.0"
fi

# The package itself with its pinned dependencies, plus the test tools.
if ! "$VENV/bin/python" -c "import mmseg_gate, pytest" >/dev/null 2>&1 \
   || [ setup.py -nt "$VENV/.gate_installed" ]; then
  echo "[install] mmseg_gate and its dependencies"
  pip_ --no-build-isolation -e ".[tests]"
  touch "$VENV/.gate_installed"
fi
