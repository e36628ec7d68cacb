#!/usr/bin/env bash
# Distributed training: bash tools/dist_train.sh CONFIG NUM_PROCS [ARGS...]
exec bash "$(dirname "$0")/dist_run.sh" "$2" train.py "$1" "${@:3}"
