#!/usr/bin/env bash
# Multi-node launch: one torchrun per node, rendezvous on the first node of the allocation.
#   sbatch --nodes=8 --ntasks-per-node=1 --gpus-per-node=8 recipes/slurm.sh RECIPE [--out DIR] [key=value ...]
# The degrees pass through as recipe overrides, e.g. Ulysses inside each node and the ring across them:
#   sbatch --nodes=4 ... recipes/slurm.sh RECIPE stages.0.ulysses=8 stages.0.sp=4
# torchrun gives each node consecutive global ranks, and the mesh puts Ulysses innermost, so a Ulysses degree
# that divides the GPUs per node keeps every all-to-all inside a node (the trainer logs where its group lies).
#SBATCH --job-name=ringlwm
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
gpus_per_node=${SLURM_GPUS_ON_NODE:-8}
if [[ -n "${ULYSSES:-}" ]] && (( gpus_per_node % ULYSSES )); then
  echo "ULYSSES=$ULYSSES does not divide the $gpus_per_node GPUs per node: its all-to-all would cross nodes" >&2
  exit 1
fi
srun torchrun \
  --nnodes="$SLURM_JOB_NUM_NODES" \
  --nproc_per_node="$gpus_per_node" \
  --rdzv_id="$SLURM_JOB_ID" \
  --rdzv_backend=c10d \
  --rdzv_endpoint="$head_node:29500" \
  -m ringlwm.train "$@"
