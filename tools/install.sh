#!/usr/bin/env bash
# Installs mmseg_gate into the project-local virtual environment .venv at exactly the versions
# of requirements/lock.txt (every package, used as pip constraints), so that every machine gets
# the verified set whatever the package index offers today.
#   GATE_VENV   another virtualenv folder (default .venv)
#   GATE_LOCK   another constraints file (tools/refresh_lock.sh resolves with requirements/pins.txt)
# Idempotent: a second run checks each step and returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GATE_VENV:-.venv}
LOCK=${GATE_LOCK:-requirements/lock.txt}
PY=${GATE_PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -f "$LOCK" ] || { echo "[install] constraints file '$LOCK' does not exist" >&2; exit 1; }
locked() { sed -n "s/^$1==\([^ ;#]*\).*/\1/p" "$LOCK" | head -n 1; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
pip_() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q -c "$LOCK" "$@"; }
# have NAME...: each is installed at its locked version (any version if the file has none).
have() { "$VENV/bin/python" - "$LOCK" "$@" <<'PYEOF' 2>/dev/null
import re, sys
from importlib.metadata import version
pins = dict(re.findall(r'^([A-Za-z0-9_.-]+)==(\S+)', open(sys.argv[1]).read(), re.M))
for name in sys.argv[2:]:
    if version(name) != pins.get(name, version(name)):
        sys.exit(1)
PYEOF
}

# Build tools first: mmcv's build and mmengine's `mmseg::` config lookup need pkg_resources.
have setuptools wheel ninja || pip_ setuptools wheel ninja

# PyPI's torch, never the local +cpu file (torchvision does not import beside it).
TORCH=$(locked torch)
if ! have torch torchvision || "$VENV/bin/python" -c "import torch,sys; sys.exit('+cpu' not in torch.__version__)"; then
  echo "[install] torch $TORCH + torchvision (several GB, about a minute)"
  pip_ "torch==$TORCH,!=$TORCH+cpu" torchvision
fi

# mmcv with its compiled ops (mmseg imports mmcv.ops). A source build: about 12 minutes on 2
# cores the first time; pip caches the wheel, so later installs take seconds.
if ! have mmcv || ! "$VENV/bin/python" -c "import mmcv.ops" >/dev/null 2>&1; then
  echo "[install] mmcv $(locked mmcv) from source (first time about 12 minutes on 2 cores)"
  MAX_JOBS=${MAX_JOBS:-2} pip_ --no-build-isolation mmcv
fi

# The package and the test tools, every dependency at its locked version.
MARK="$VENV/.gate_installed"
if ! "$VENV/bin/python" -c "import mmseg_gate, pytest" >/dev/null 2>&1 \
   || [ setup.py -nt "$MARK" ] || [ "$LOCK" -nt "$MARK" ] \
   || [ "$(cat "$MARK" 2>/dev/null)" != "$LOCK" ]; then
  echo "[install] mmseg_gate and its dependencies ($LOCK)"
  pip_ --no-build-isolation -e ".[tests]"
  echo "$LOCK" > "$MARK"
fi

# guided-diffusion's own UNet, for the tests only: the independent forward the ADM mapping
# (mmseg_gate/sources/adm.py) is checked against. Without its dependencies: its setup.py asks
# for blobfile and mpi4py, which its unet.py never imports.
have guided-diffusion-sdk || pip_ --no-deps --no-build-isolation guided-diffusion-sdk
