#!/usr/bin/env bash
# Multi-GPU training with DDP through torchrun: each rank draws different episodes; rank 0 logs and checkpoints.
# One node:   NPROC=4 bash examples/train_ddp.sh with CHAOST2 setting1 eval_fold=0
# Several nodes (run on each node, same MASTER_ADDR/PORT, NODE_RANK 0..NNODES-1):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC=8 bash examples/train_ddp.sh with SABS
# The effective batch is NPROC x NNODES x batch_size episodes per step; scale optim.lr if you change it.
# Elastic rendezvous instead of a fixed master (same command on every node):
#   .venv/bin/python -m torch.distributed.run --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \
#     --rdzv_endpoint=10.0.0.1:29400 --rdzv_id=alpnet_sabs training.py with SABS
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NPROC=${NPROC:-2}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [ "$NNODES" = 1 ]; then
  # one node: --standalone picks a free port, so two jobs on one machine do not collide
  exec $PY -m torch.distributed.run --standalone --nproc_per_node="$NPROC" training.py "$@"
fi
exec $PY -m torch.distributed.run --nproc_per_node="$NPROC" --nnodes="$NNODES" --node_rank="$NODE_RANK" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" training.py "$@"
