#!/usr/bin/env bash
# Distributed extraction: bash tools/dist_extract.sh CONFIG NUM_PROCS --out DIR [ARGS...]
# Each process extracts every NUM_PROCS-th image; rank 0 writes the complete manifest.
exec bash "$(dirname "$0")/dist_run.sh" "$2" extract_features.py "$1" "${@:3}"
