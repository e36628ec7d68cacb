#!/usr/bin/env bash
# The test suite: install (if needed), then pytest offline on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES=""
exec .venv/bin/python -m pytest tests "$@"
