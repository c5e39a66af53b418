#!/usr/bin/env bash
# Runs train.py under torchrun with one process per visible GPU.
#
# Environment (all optional):
#   NPROC_PER_NODE  processes on this node (default: GPUs listed by nvidia-smi -L, else 1)
#   NNODES          nodes in the job (default 1)
#   NODE_RANK       this node's index (default 0; SLURM_NODEID when under SLURM)
#   MASTER_ADDR     rendezvous host (required when NNODES > 1)
#   MASTER_PORT     rendezvous port (default 29500)
#   RDZV_ID         job id shared by all nodes (default SLURM_JOB_ID or "relabel")
#   RELABEL_DALI_HOME  the project folder train.py is run in (default /workspace/relabel_dali)
# Arguments are passed to train.py unchanged.
set -euo pipefail

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU '); then
    NPROC_PER_NODE=$gpus
  fi
  NPROC_PER_NODE=${NPROC_PER_NODE:-1}
  [[ "$NPROC_PER_NODE" -ge 1 ]] || NPROC_PER_NODE=1
fi
NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-relabel}}

cd "${RELABEL_DALI_HOME:-/workspace/relabel_dali}"
if [[ "$NNODES" -gt 1 ]]; then
  : "${MASTER_ADDR:?MASTER_ADDR must name the rendezvous host when NNODES > 1}"
  exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" --node_rank="$NODE_RANK" \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RDZV_ID" \
    train.py "$@"
fi
# One node: the rendezvous stays on the loopback address, so a container whose hostname does not
# resolve (no /etc/hosts entry for it) still starts.
exec torchrun --standalone --local-addr=127.0.0.1 --nproc_per_node="$NPROC_PER_NODE" train.py "$@"
