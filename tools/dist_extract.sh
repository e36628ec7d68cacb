#!/usr/bin/env bash
# Distributed extraction: bash tools/dist_extract.sh CONFIG NUM_PROCS --out DIR [ARGS...]
# Each process extracts every NUM_PROCS-th image; rank 0 writes the complete manifest.
# Without CUDA the processes use gloo (see mmseg_gate/engine/distributed.py).
CONFIG=$1
NPROCS=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
PYTHON=${PYTHON:-python}

PYTHONPATH="$(dirname "$0")/..":$PYTHONPATH \
"$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$NPROCS" --master_port="$PORT" \
    "$(dirname "$0")/extract_features.py" "$CONFIG" --launcher pytorch "${@:3}"
