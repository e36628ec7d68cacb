#!/usr/bin/env bash
# torchrun for the dist_*.sh launchers: bash tools/dist_run.sh NUM_PROCS TOOL.py [ARGS...]
# runs tools/TOOL.py ARGS --launcher pytorch on NUM_PROCS processes of this node. On machines
# without CUDA the processes use gloo (see mmseg_gate/engine/distributed.py).
NPROCS=$1
TOOL=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
PYTHON=${PYTHON:-python}

PYTHONPATH="$(dirname "$0")/..":$PYTHONPATH \
"$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$NPROCS" --master_port="$PORT" \
    "$(dirname "$0")/$TOOL" "${@:3}" --launcher pytorch
