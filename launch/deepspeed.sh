#!/usr/bin/env bash
# launch/deepspeed.sh: run `cifar-dist train` under DeepSpeed's launcher (one process per GPU,
# or 2 on CPU). The config picks the engine: use a DeepSpeed config (parallel.engine: deepspeed).
#
# Usage (from the repository root; every argument goes to `cifar-dist train`):
#   launch/deepspeed.sh -c configs/ds_zero2.yaml [--section.key=value ...]
#   NPROC=2 launch/deepspeed.sh -c configs/ds_zero1.yaml --train.device=cpu   # CPU, gloo
#   # several nodes (passwordless ssh + pdsh, the same path on every node):
#   HOSTFILE=launch/hostfile MASTER_ADDR=node0 launch/deepspeed.sh -c configs/ds_zero2.yaml
#
# It runs: deepspeed --num_gpus NPROC --master_port PORT --module cifar_dist train ARGS
# (`--module`, not `-m`: the launcher has no short flag). The launcher passes --local_rank=N,
# which the CLI accepts and ignores (it reads LOCAL_RANK, which the launcher sets too).
#
# Environment (all optional):
#   NPROC            processes per node; default: the visible GPU count, or 2 without a GPU.
#                    On CPU DeepSpeed counts a single "device", so --num_gpus is always passed
#   HOSTFILE         DeepSpeed hostfile ("host slots=N" lines, see launch/hostfile.example);
#                    unset = this machine only
#   MASTER_ADDR      address of the first node (with HOSTFILE; default: DeepSpeed's choice)
#   MASTER_PORT      rendezvous port; default: a free port on one node, 29500 with HOSTFILE
#   OMP_NUM_THREADS  threads per process; default: CPU cores / NPROC, at least 1 (DeepSpeed's
#                    launcher, unlike torchrun, sets none)
#   DEEPSPEED        launcher executable (default: deepspeed on PATH, else .venv/bin/deepspeed)
#   PYTHON           python used to count GPUs and check the config (default: the python next
#                    to DEEPSPEED)
#   CHECK_CONFIG     0 skips loading the config once before launching (default 1: a config
#                    error then stops here with its one line, not on every rank)
#
# Exit code: 0 done; 75 pre-empted (SIGTERM/SIGINT/SIGUSR1) after a checkpoint: run it again
# with --train.resume=auto; anything else: a failure.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/lib.sh
source "$root/launch/lib.sh"

if [[ -z ${DEEPSPEED:-} ]]; then
  if command -v deepspeed >/dev/null 2>&1; then
    DEEPSPEED=$(command -v deepspeed)
  elif [[ -x $root/.venv/bin/deepspeed ]]; then
    DEEPSPEED=$root/.venv/bin/deepspeed
  else
    echo "deepspeed.sh: deepspeed not found; install the extra (DS_BUILD_OPS=0 pip install -e '.[deepspeed]') or set DEEPSPEED" >&2
    exit 1
  fi
fi
if [[ -z ${PYTHON:-} ]]; then
  PYTHON=$(dirname "$DEEPSPEED")/python
  [[ -x $PYTHON ]] || PYTHON=python3
fi

if [[ -z ${NPROC:-} ]]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  else
    NPROC=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  fi
  if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then # a restricted view (Slurm, shared boxes)
    IFS=, read -r -a ids <<<"${CUDA_VISIBLE_DEVICES/NoDevFiles/}"
    NPROC=${#ids[@]}
  fi
  ((NPROC >= 1)) || NPROC=2 # CPU: two gloo processes exercise the distributed path
fi

if [[ -z ${OMP_NUM_THREADS:-} ]]; then
  cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)
  OMP_NUM_THREADS=$((cores / NPROC))
  ((OMP_NUM_THREADS >= 1)) || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS

args=(--num_gpus "$NPROC")
if [[ -n ${HOSTFILE:-} ]]; then
  [[ -f $HOSTFILE ]] || { echo "deepspeed.sh: hostfile $HOSTFILE not found" >&2; exit 2; }
  args+=(--hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}")
  [[ -z ${MASTER_ADDR:-} ]] || args+=(--master_addr "$MASTER_ADDR")
else
  # One node: a free port, so concurrent jobs (and test runs) do not collide on 29500.
  port=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
  args+=(--master_port "$port")
fi

# Exit code: 75 (EX_TEMPFAIL) after a checkpointed pre-emption. The DeepSpeed launcher passes on
# the first failed worker's code, but reports 1 when it got the signal itself; each node's local
# rank 0 writes this marker after the checkpoint (cifar_dist/train/preemption.py).
new_preempt_marker # launch/lib.sh

check_config "$PYTHON" "$@" # launch/lib.sh: a config error ends here, in one line
echo "+ OMP_NUM_THREADS=$OMP_NUM_THREADS $DEEPSPEED ${args[*]} --module cifar_dist train $*" >&2
# The launcher runs in the background in its own process group (set -m): a signal to this
# script's group reaches it once, through the trap. It forwards SIGTERM/SIGINT to the workers,
# which checkpoint and exit; SIGUSR1 is sent on as SIGTERM (the launcher does not handle it).
set -m
"$DEEPSPEED" "${args[@]}" --module cifar_dist train "$@" &
pid=$!
set +m
# shellcheck disable=SC2317  # trap handlers are invoked indirectly
forward() { kill -s "$1" "$pid" 2>/dev/null || true; }
trap 'forward TERM' TERM USR1
trap 'forward INT' INT
wait_launcher "deepspeed.sh" "$pid" # launch/lib.sh: exits
