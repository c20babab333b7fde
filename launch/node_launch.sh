#!/usr/bin/env bash
# One node's part of a multi-node run: one `accelerate launch` that starts PROCS_PER_NODE training
# processes on this node and meets the other nodes at MAIN_ADDR:MAIN_PORT (c10d rendezvous).
#
#   NUM_NODES=2 NODE_RANK=0 MAIN_ADDR=node001 MAIN_PORT=29400 PROCS_PER_NODE=8 \
#     bash launch/node_launch.sh CONFIG [key=value ...]        # on node001
#   NUM_NODES=2 NODE_RANK=1 MAIN_ADDR=node001 MAIN_PORT=29400 PROCS_PER_NODE=8 \
#     bash launch/node_launch.sh CONFIG [key=value ...]        # on node002
#
# launch/slurm_multinode.sh runs it once per node through srun; it needs nothing from SLURM itself, so
# it runs by hand (or in the tests: two "nodes" on one machine over 127.0.0.1).
#
# Environment (required): NUM_NODES, NODE_RANK (0..NUM_NODES-1; node 0 hosts the rendezvous store, so
# MAIN_ADDR must be node 0's address), MAIN_ADDR, MAIN_PORT, PROCS_PER_NODE.
# Environment (optional): ACCELERATE_CONFIG (default launch/multi_node.yaml; it must not say
# same_network: true), PYTHON (default python), RDZV_TIMEOUT (seconds the nodes wait for each other,
# default 900), TORCH_ELASTIC_SHUTDOWN_TIMEOUT (default 300, see below).
#
# Arguments: the config and its overrides, handed to train.py as they are (each argument stays one
# argument: no shell re-parses them, so spaces, quotes, $ and * arrive unchanged).
#
# Stopping (what SLURM's warning signal turns into, see docs/multi-gpu.md): SIGUSR1, SIGUSR2 or SIGTERM
# to this script sends ONE SIGTERM to each training process of this node; they finish the step, write a
# checkpoint together and exit 0 (stepdistill/harness/signals.py ignores a repeated SIGTERM while
# stopping, but one is all they need). accelerate and the training processes are started with SIGUSR1
# and SIGUSR2 ignored, so a signal that SLURM delivers to every process of the step (srun forwards
# SIGUSR1 that way) only reaches them through this script. SIGINT (Ctrl-C) is left to accelerate, which
# forwards it to the training processes once itself. TORCH_ELASTIC_SHUTDOWN_TIMEOUT is how long
# accelerate (torchrun) then waits for them before SIGKILL; torch's default, 30 s, is short for
# gathering and writing a large FSDP2 checkpoint.
set -euo pipefail

die() { echo "node_launch.sh: $*" >&2; exit 2; }

need_int() {  # need_int NAME MIN: $NAME is set and an integer >= MIN
  local name=$1 min=$2 value=${!1:-}
  [[ -n "$value" ]] || die "$name is not set; set NUM_NODES, NODE_RANK, MAIN_ADDR, MAIN_PORT and PROCS_PER_NODE (see the top of this script)"
  [[ "$value" =~ ^[0-9]+$ ]] || die "$name=$value is not a whole number"
  (( value >= min )) || die "$name=$value must be at least $min"
}

(( $# >= 1 )) || die "usage: NUM_NODES=.. NODE_RANK=.. MAIN_ADDR=.. MAIN_PORT=.. PROCS_PER_NODE=.. $0 CONFIG [key=value ...]"
need_int NUM_NODES 1
need_int NODE_RANK 0
need_int MAIN_PORT 1
need_int PROCS_PER_NODE 1
(( NODE_RANK < NUM_NODES )) || die "NODE_RANK=$NODE_RANK must be below NUM_NODES=$NUM_NODES (ranks count from 0)"
(( MAIN_PORT <= 65535 )) || die "MAIN_PORT=$MAIN_PORT is not a TCP port (1..65535)"
[[ -n "${MAIN_ADDR:-}" ]] || die "MAIN_ADDR is not set; give node 0's host name or address (the same on every node)"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-$REPO/launch/multi_node.yaml}
PYTHON=${PYTHON:-python}
RDZV_TIMEOUT=${RDZV_TIMEOUT:-900}
need_int RDZV_TIMEOUT 1
[[ -f "$ACCELERATE_CONFIG" ]] || die "ACCELERATE_CONFIG=$ACCELERATE_CONFIG: no such file"
if grep -Eq '^[[:space:]]*same_network:[[:space:]]*true' "$ACCELERATE_CONFIG"; then
  die "ACCELERATE_CONFIG=$ACCELERATE_CONFIG says same_network: true, which drops the c10d rendezvous address (every node would wait alone on localhost); use launch/multi_node.yaml or set same_network: false"
fi
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}

# Node 0 hosts the rendezvous store (is_host=1); the others only connect to it. Without is_host torch
# guesses from the host name, which fails when MAIN_ADDR is an alias (an InfiniBand name) of node 0.
is_host=0
(( NODE_RANK == 0 )) && is_host=1
launch=(
  "$PYTHON" -m accelerate.commands.launch
  --config_file "$ACCELERATE_CONFIG"
  --num_machines "$NUM_NODES"
  --num_processes "$(( NUM_NODES * PROCS_PER_NODE ))"
  --machine_rank "$NODE_RANK"
  --main_process_ip "$MAIN_ADDR"
  --main_process_port "$MAIN_PORT"
  --rdzv_backend c10d
  --rdzv_conf "is_host=$is_host,join_timeout=$RDZV_TIMEOUT,read_timeout=$RDZV_TIMEOUT"
  --max_restarts 0
  "$REPO/train.py" --config "$@"
)
echo "node_launch.sh: node $NODE_RANK of $NUM_NODES, $PROCS_PER_NODE processes, rendezvous $MAIN_ADDR:$MAIN_PORT" >&2

children_of() {  # the pids whose parent is $1 (from /proc: no pgrep needed)
  local stat line rest ppid
  for stat in /proc/[0-9]*/stat; do
    read -r line 2>/dev/null < "$stat" || continue
    rest=${line##*) }           # the command name may hold spaces or ')': cut after the last ') '
    read -r _ ppid _ <<< "$rest"
    if [[ "$ppid" == "$1" ]]; then
      line=${stat#/proc/}
      echo "${line%/stat}"
    fi
  done
}

launcher=""
stopping=0
interrupted=0
request_stop() {
  interrupted=1
  (( stopping )) && return 0  # one SIGTERM per training process, however many signals arrive
  stopping=1
  [[ -n "$launcher" ]] || return 0  # not started yet: it is stopped as soon as it starts
  local workers
  workers=$(children_of "$launcher")
  if [[ -n "$workers" ]]; then
    echo "node_launch.sh: $1: asking the training processes ($(echo $workers)) to checkpoint and stop" >&2
    # shellcheck disable=SC2086
    kill -TERM $workers 2>/dev/null || true
  else  # no training process yet (still meeting the other nodes): nothing to save, end the launcher
    echo "node_launch.sh: $1 before the training processes started: stopping the launcher" >&2
    kill -TERM "$launcher" 2>/dev/null || true
  fi
}
trap 'request_stop SIGUSR1' USR1
trap 'request_stop SIGUSR2' USR2
trap 'request_stop SIGTERM' TERM
trap 'interrupted=1' INT   # Ctrl-C reaches accelerate too (same process group), which forwards it once

# The launcher and its training processes ignore SIGUSR1/SIGUSR2 (inherited across exec); this shell
# keeps them to turn them into one SIGTERM per training process.
( trap '' USR1 USR2; exec "${launch[@]}" ) &
launcher=$!
if (( stopping )); then kill -TERM "$launcher" 2>/dev/null || true; fi  # a signal came before the start

# `wait` returns early (status > 128) when a trapped signal arrives: wait again until the launcher ends.
while :; do
  interrupted=0
  status=0
  wait "$launcher" || status=$?
  (( interrupted && status > 128 )) || break
done
exit "$status"
