#!/usr/bin/env bash
# Distributed correspondence training: bash tools/dist_correspondence.sh CONFIG NUM_PROCS [ARGS...]
# (tools/correspondence.py train on NUM_PROCS processes: one pair per process and step,
# gradients averaged; rank 0 validates, tests and writes).
exec bash "$(dirname "$0")/dist_run.sh" "$2" correspondence.py train "$1" "${@:3}"
