#!/usr/bin/env bash
# Train with the DeepSpeed launcher and the DeepSpeed engine (ZeRO-1, bf16).
#
#   examples/deepspeed/launch_deepspeed.sh [config.yaml] [ds_config.json] [extra --section.key value ...]
#
# With ssh between the nodes of examples/deepspeed/hostfile, run this once on the first node.
# Without ssh, run it on every node with NO_SSH=1 NODE_RANK=<i> MASTER_ADDR=<first node>:
# the launcher then starts only the local processes (deepspeed --no_ssh --node_rank).
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=${1:-examples/ssa_1b_8k.yaml}
DS_CONFIG=${2:-examples/deepspeed/zero1_bf16.json}
shift $(( $# > 2 ? 2 : $# ))
HOSTFILE=${HOSTFILE:-examples/deepspeed/hostfile}
MASTER_ADDR=${MASTER_ADDR:-$(head -n 1 <(grep -v '^#' "$HOSTFILE") | awk '{print $1}')}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-.venv/bin/python}

ARGS=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
if [[ "${NO_SSH:-0}" == "1" ]]; then
  ARGS+=(--no_ssh --node_rank "${NODE_RANK:?set NODE_RANK for --no_ssh}")
fi
exec "$(dirname "$PYTHON")/deepspeed" "${ARGS[@]}" pretrain_ssa.py \
  --config "$CONFIG" --deepspeed --deepspeed_config "$DS_CONFIG" "$@"
