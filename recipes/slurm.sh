#!/usr/bin/env bash
# Multi-node launch: one torchrun per node, rendezvous on the first node of the allocation.
#   sbatch --nodes=8 --ntasks-per-node=1 --gpus-per-node=8 recipes/slurm.sh RECIPE [--out DIR] [key=value ...]
#SBATCH --job-name=ringlwm
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
gpus_per_node=${SLURM_GPUS_ON_NODE:-8}
srun torchrun \
  --nnodes="$SLURM_JOB_NUM_NODES" \
  --nproc_per_node="$gpus_per_node" \
  --rdzv_id="$SLURM_JOB_ID" \
  --rdzv_backend=c10d \
  --rdzv_endpoint="$head_node:29500" \
  -m ringlwm.train "$@"
