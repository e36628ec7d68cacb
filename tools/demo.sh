#!/usr/bin/env bash
# The main job on the embedded default: install (if needed), write the demo data and tiny
# model with its ControlNet and two LoRAs, train configs/gate_upernet_demo.py on the CPU
# and evaluate the last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
export HF_HUB_OFFLINE=1
PY=${GATE_VENV:-.venv}/bin/python
WORK=${WORK_DIR:-work_dirs/gate_upernet_demo}
$PY tools/make_demo.py --out data/demo
[ -f data/demo/lora/lora_step200.safetensors ] || $PY tools/train_lora.py configs/lora/demo.py
$PY tools/train.py configs/gate_upernet_demo.py --work-dir "$WORK" "$@"
$PY tools/test.py configs/gate_upernet_demo.py "$(cat "$WORK/last_checkpoint")" --work-dir "$WORK"
