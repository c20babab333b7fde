#!/bin/bash
# Multi-node training on SLURM: one launch/node_launch.sh (one `accelerate launch`) per node through srun,
# each starting one process per GPU; stopped, checkpointed and requeued before the time limit.
#
#   sbatch launch/slurm_multinode.sh dmd2_sdxl [key=value ...]            # from the repository root
#   sbatch --nodes=8 --time=24:00:00 launch/slurm_multinode.sh dmd2_sdxl train.parallel=fsdp2
#
# The first argument is the config (name or path); the rest are config overrides, passed to train.py on
# every node exactly as given (spaces, quotes and $ included). Every start passes train.resume=latest
# before them: the first start trains from scratch (nothing to resume yet), a requeued start continues
# from the newest checkpoint. run.output_dir must be on storage every node sees (every process writes
# into the checkpoint folder and reads it on resume; process 0, which may be on any node, writes the rest).
#
# The cycle (docs/multi-gpu.md, "Multi-node (SLURM)"): --signal=B:USR1@300 makes SLURM send SIGUSR1 to
# this batch shell 300 s before the time limit. The trap forwards SIGUSR1 through srun to every node's
# node_launch.sh, which sends one SIGTERM to each training process; they finish the step, write one
# checkpoint and exit 0; then this script runs `scontrol requeue`, and the job starts again from the top.
# `scancel --batch --signal=USR1 <job>` does the same by hand; `--signal=USR2` stops without the requeue. A plain scancel, a
# preemption or the time limit itself end the step at once (srun turns the SIGTERM it gets into SIGKILL
# for its tasks): the run then resumes from its last periodic checkpoint (train.checkpoint_every).
#
# Environment (optional): PROCS_PER_NODE (default: SLURM's GPUs per node, else 8), MAIN_PORT (default:
# 10000 + job id % 20000, so two jobs sharing a node do not meet on one port), ACCELERATE_CONFIG,
# RDZV_TIMEOUT, TORCH_ELASTIC_SHUTDOWN_TIMEOUT (see node_launch.sh), MAX_REQUEUES (default 50),
# STEPDISTILL_REPO (the checkout; default the submit directory). NCCL/gloo settings (NCCL_SOCKET_IFNAME,
# GLOO_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG ...) exported before sbatch reach every node (sbatch's
# default --export=ALL); see docs/multi-gpu.md.
#SBATCH --job-name=stepdistill
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

if (( $# < 1 )); then
  echo "usage: sbatch $0 CONFIG [key=value ...]" >&2
  exit 2
fi
: "${SLURM_JOB_ID:?not inside a SLURM job: submit with sbatch (or run launch/node_launch.sh on each node yourself)}"

REPO=${STEPDISTILL_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
NODE_LAUNCH=$REPO/launch/node_launch.sh
if [[ ! -f "$NODE_LAUNCH" ]]; then
  echo "slurm_multinode.sh: $NODE_LAUNCH not found: submit from the repository root or set STEPDISTILL_REPO" >&2
  exit 2
fi

NUM_NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:?SLURM did not say how many nodes the job has}}
gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-8}}
PROCS_PER_NODE=${PROCS_PER_NODE:-${gpus##*:}}   # SLURM_GPUS_PER_NODE may read "h100:8"
# The whole list first: `| head -n 1` can kill scontrol with SIGPIPE, which pipefail turns into an exit.
hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
MAIN_ADDR=${hosts%%$'\n'*}   # node 0 (SLURM_NODEID 0 is the first host of the list)
[[ -n "$MAIN_ADDR" ]] || { echo "slurm_multinode.sh: scontrol gave no host for $SLURM_JOB_NODELIST" >&2; exit 2; }
MAIN_PORT=${MAIN_PORT:-$(( 10000 + SLURM_JOB_ID % 20000 ))}
MAX_REQUEUES=${MAX_REQUEUES:-50}
RESTARTS=${SLURM_RESTART_COUNT:-0}
export NUM_NODES MAIN_ADDR MAIN_PORT PROCS_PER_NODE
unset NODE_RANK  # set per node below, from SLURM_NODEID (node 0 is the first host: MAIN_ADDR)

echo "slurm_multinode.sh: job $SLURM_JOB_ID start $RESTARTS: $NUM_NODES nodes x $PROCS_PER_NODE processes," \
     "rendezvous $MAIN_ADDR:$MAIN_PORT, config $1" >&2

srun_args=(--nodes="$NUM_NODES" --ntasks="$NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1)
# srun does not take --cpus-per-task from sbatch on every SLURM version (22.05 stopped reading
# SLURM_CPUS_PER_TASK): without it each node's launcher would be bound to one CPU.
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi

requeue=0
interrupted=0
srun_pid=""
forward_stop() {  # $1: requeue afterwards (1) or not (0)
  interrupted=1
  requeue=$1
  echo "slurm_multinode.sh: stop requested (requeue=$requeue): forwarding SIGUSR1 to every node" >&2
  # srun forwards SIGUSR1 to its tasks; SIGTERM it would turn into SIGKILL.
  if [[ -n "$srun_pid" ]]; then kill -USR1 "$srun_pid" 2>/dev/null || true; fi
}
trap 'forward_stop 1' USR1
trap 'forward_stop 0' USR2
trap 'interrupted=1; echo "slurm_multinode.sh: SIGTERM: SLURM is ending the job (scancel, preemption or the time limit)" >&2' TERM

# srun runs in the background so that the traps run while it does (a shell runs a trap only between
# commands, and `wait` is one it interrupts). The task command is a constant string; the node script and the config arguments travel as its
# positional parameters, so no shell on the nodes parses them again.
srun "${srun_args[@]}" bash -c 'export NODE_RANK=$SLURM_NODEID; exec bash "$@"' node-launch \
  "$NODE_LAUNCH" "$1" train.resume=latest "${@:2}" &
srun_pid=$!

# `wait` returns early (status > 128) when a trapped signal arrives: wait again until srun ends.
while :; do
  interrupted=0
  status=0
  wait "$srun_pid" || status=$?
  (( interrupted && status > 128 )) || break
done

if (( requeue )); then
  if (( RESTARTS >= MAX_REQUEUES )); then
    echo "slurm_multinode.sh: not requeueing: this was start $RESTARTS (MAX_REQUEUES=$MAX_REQUEUES)" >&2
    exit "$status"
  fi
  echo "slurm_multinode.sh: training stopped (srun exit $status); requeueing job $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
