#!/usr/bin/env bash
# Multi-node training with torchrun and a c10d rendezvous. Run the same command on every node:
#
#   NNODES=8 RDZV_HOST=node001 examples/torchrun_multinode.sh examples/ssa_1b_8k.yaml [--section.key value ...]
#
# RDZV_HOST is any node all others can reach (the first one is usual); nodes join in any order,
# torchrun assigns node ranks. Checkpoint and data paths must be on storage every node sees
# (checkpoints are written by all ranks into one directory; `latest` is published by rank 0).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: torchrun_multinode.sh CONFIG.yaml [overrides]}
shift
NNODES=${NNODES:?set NNODES}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
RDZV_HOST=${RDZV_HOST:?set RDZV_HOST to a reachable node}
RDZV_PORT=${RDZV_PORT:-29400}
RDZV_ID=${RDZV_ID:-ssa-$(basename "$CONFIG" .yaml)}
PYTHON=${PYTHON:-.venv/bin/python}

# Fail fast on a broken fabric rather than hanging in the first collective.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv-id "$RDZV_ID" \
  --max-restarts 0 \
  pretrain_ssa.py --config "$CONFIG" "$@"
