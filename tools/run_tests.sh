#!/usr/bin/env bash
# The test suite: install (if needed), then pytest offline. CPU only unless GATE_TEST_CUDA=1
# (then the CUDA tests in tests/test_cuda.py run too). GATE_VENV: another virtualenv folder.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "${GATE_TEST_CUDA:-0}" != "1" ]; then export CUDA_VISIBLE_DEVICES=""; fi
exec "${GATE_VENV:-.venv}/bin/python" -m pytest tests "$@"
