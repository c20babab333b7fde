#!/bin/bash
# Multi-node training on SLURM: one `accelerate launch` per node (srun), each starting one process per GPU.
#
#   sbatch launch/slurm_multinode.sh dmd2_sdxl [key=value ...]
#   sbatch --nodes=8 launch/slurm_multinode.sh dmd2_sdxl          # the config sets train.parallel: fsdp2
#
# The first argument is the config (name or path); the rest are config overrides. The node rank,
# the number of machines and the rendezvous address come from SLURM's variables; the accelerate
# config file (DDP by default) supplies the rest. The runs folder must be on storage shared by all
# nodes (checkpoints are written by rank 0 and read back by all on resume).
#SBATCH --job-name=stepdistill
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

if [ "$#" -lt 1 ]; then
  echo "usage: sbatch $0 CONFIG [key=value ...]" >&2
  exit 2
fi

ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launch/multi_gpu_ddp.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
NUM_NODES=${SLURM_NNODES:-1}
MAIN_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}

echo "nodes=${NUM_NODES} gpus/node=${GPUS_PER_NODE} main=${MAIN_ADDR}:${MAIN_PORT} accelerate=${ACCELERATE_CONFIG}"

# Single quotes: SLURM_NODEID / SLURM_PROCID are expanded on each node by the srun task, not here.
srun --kill-on-bad-exit=1 bash -c '
  accelerate launch \
    --config_file "'"${ACCELERATE_CONFIG}"'" \
    --num_machines "'"${NUM_NODES}"'" \
    --num_processes "'"$((NUM_NODES * GPUS_PER_NODE))"'" \
    --machine_rank "${SLURM_NODEID}" \
    --main_process_ip "'"${MAIN_ADDR}"'" \
    --main_process_port "'"${MAIN_PORT}"'" \
    --rdzv_backend c10d \
    --same_network \
    train.py --config "$@"
' stepdistill-node "$@"
