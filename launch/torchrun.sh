#!/usr/bin/env bash
# launch/torchrun.sh: run `cifar-dist train` under torchrun, one process per GPU (or 2 on CPU).
#
# Usage (from the repository root; every argument goes to `cifar-dist train`):
#   launch/torchrun.sh -c CONFIG [--section.key=value ...]
#   NPROC=2 launch/torchrun.sh -c configs/debug_cpu.yaml --train.device=cpu
#   # multi-node: run the same command on every node
#   NNODES=2 MASTER_ADDR=node0 RDZV_ID=run42 launch/torchrun.sh -c CONFIG --log.name=run42
#
# Environment (all optional):
#   NPROC             processes on this node; default: the visible GPU count, or 2 without a GPU
#   NNODES            nodes (default 1). 1 = standalone rendezvous on this machine; anything else
#                     ("2", or "MIN:MAX" for elastic membership) = c10d rendezvous at
#                     MASTER_ADDR:MASTER_PORT
#   MASTER_ADDR       host of the c10d rendezvous store (required when NNODES != 1)
#   MASTER_PORT       its port (default 29500)
#   RDZV_ID           rendezvous id, identical on all nodes of one job (default cifar-dist)
#   MAX_RESTARTS      worker-group restarts after a failure (default 0). With restarts, pass a
#                     fixed --log.name and --train.resume=auto so a restart resumes
#                     instead of starting a new run
#   SHUTDOWN_TIMEOUT  seconds torchrun gives workers to checkpoint after SIGTERM/SIGUSR1
#                     before SIGKILL (default 90)
#   LOG_DIR           torchrun per-rank logs (default runs/torchrun-logs); torchrun writes
#                     <LOG_DIR>/<rdzv id>_<random>/attempt_<n>/<local rank>/{stdout,stderr}.log
#   OMP_NUM_THREADS   threads per process; default: CPU cores / NPROC, at least 1
#   TORCHRUN          torchrun executable (default: torchrun on PATH, else .venv/bin/torchrun)
#   PYTHON            python used to count GPUs and check the config (default: the python next
#                     to TORCHRUN)
#   CHECK_CONFIG      0 skips loading the config once before launching (default 1: a config
#                     error then stops here with its one line, not on every rank)
#
# Exit code: 0 done; 75 pre-empted (SIGTERM/SIGUSR1) after a checkpoint: run the same command
# again with --train.resume=auto; anything else: a failure (torchrun itself reports 1 for any
# failed worker; this script maps that to 75 only when the workers left the pre-emption marker).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/lib.sh
source "$root/launch/lib.sh"

# --- the torchrun and python of the active environment (or the repo's .venv) -----------------
if [[ -z ${TORCHRUN:-} ]]; then
  if command -v torchrun >/dev/null 2>&1; then
    TORCHRUN=$(command -v torchrun)
  elif [[ -x $root/.venv/bin/torchrun ]]; then
    TORCHRUN=$root/.venv/bin/torchrun
  else
    echo "torchrun.sh: torchrun not found; activate the environment or set TORCHRUN" >&2
    exit 1
  fi
fi
if [[ -z ${PYTHON:-} ]]; then
  PYTHON=$(dirname "$TORCHRUN")/python
  [[ -x $PYTHON ]] || PYTHON=python3
fi

# --- processes per node ---------------------------------------------------------------------
gpu_count() {
  local n=0
  if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
    # Respect a restricted view (Slurm, shared boxes): count its comma-separated entries
    # ("" and Slurm's "NoDevFiles" mean no GPU).
    local -a ids=()
    if [[ $CUDA_VISIBLE_DEVICES != NoDevFiles ]]; then
      IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
    fi
    n=${#ids[@]}
  elif command -v nvidia-smi >/dev/null 2>&1; then
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  else
    n=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  fi
  echo "${n:-0}"
}
if [[ -z ${NPROC:-} ]]; then
  NPROC=$(gpu_count)
  if ((NPROC < 1)); then
    NPROC=2 # CPU: two gloo processes exercise the distributed path
  fi
fi

# --- threads per process: share this node's cores between the workers ---------------------
if [[ -z ${OMP_NUM_THREADS:-} ]]; then
  cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)
  OMP_NUM_THREADS=$((cores / NPROC))
  ((OMP_NUM_THREADS >= 1)) || OMP_NUM_THREADS=1
  export OMP_NUM_THREADS
fi

# --- rendezvous -----------------------------------------------------------------------------
NNODES=${NNODES:-1}
MAX_RESTARTS=${MAX_RESTARTS:-0}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-90}
LOG_DIR=${LOG_DIR:-runs/torchrun-logs}
mkdir -p "$LOG_DIR"

args=(--nproc-per-node="$NPROC" --max-restarts="$MAX_RESTARTS")
if [[ $NNODES == 1 ]]; then
  # A private c10d store on a free port: no MASTER_ADDR/PORT needed, no clash between jobs.
  args+=(--standalone --nnodes=1)
else
  : "${MASTER_ADDR:?NNODES=$NNODES needs MASTER_ADDR (the host of the rendezvous store)}"
  args+=(
    --nnodes="$NNODES"
    --rdzv-backend=c10d
    --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}"
    --rdzv-id="${RDZV_ID:-cifar-dist}"
  )
fi

# Forward SIGUSR1 (Slurm's pre-emption warning) as well as the default SIGTERM/SIGINT/SIGHUP/
# SIGQUIT to the workers, and give them time to write a checkpoint before torchrun kills them.
# Both flags are recent torchrun additions: add them only when this torch has them (read from
# torch/distributed/run.py; find_spec locates it without importing torch).
run_py=$("$PYTHON" -c 'import importlib.util as u; print(u.find_spec("torch").submodule_search_locations[0] + "/distributed/run.py")' 2>/dev/null || true)
if [[ -f $run_py ]] && grep -q -- '--signals-to-handle' "$run_py"; then
  args+=("--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
else
  echo "torchrun.sh: warning: this torchrun cannot forward SIGUSR1; pre-emption needs SIGTERM" >&2
fi
if [[ -f $run_py ]] && grep -q -- '--shutdown-timeout' "$run_py"; then
  args+=(--shutdown-timeout="$SHUTDOWN_TIMEOUT")
fi

# Per-rank stdout/stderr files, also echoed to this console (3 = both streams).
args+=(--log-dir="$LOG_DIR" --tee=3)

if ((MAX_RESTARTS > 0)); then
  fixed_name=0
  for a in "$@"; do
    if [[ $a == --log.name=* || $a == --log.name ]]; then
      fixed_name=1
    fi
  done
  if ((fixed_name == 0)); then
    echo "torchrun.sh: warning: MAX_RESTARTS=$MAX_RESTARTS without --log.name=NAME: a restart" \
      "gets a new timestamped run directory and cannot resume (add --train.resume=auto too)" >&2
  fi
fi

# --- exit code: a pre-emption (checkpoint written) exits 75 (EX_TEMPFAIL) -------------------
# torchrun reports 1 for any failed worker, a checkpointed pre-emption included. Each node's
# local rank 0 writes this marker after the checkpoint (cifar_dist/train/preemption.py), and
# this script then exits 75 instead: requeue on 75, investigate anything else non-zero.
new_preempt_marker # launch/lib.sh

check_config "$PYTHON" "$@" # launch/lib.sh: a config error ends here, in one line
echo "+ OMP_NUM_THREADS=$OMP_NUM_THREADS $TORCHRUN ${args[*]} -m cifar_dist train $*" >&2
# torchrun runs in the background in its own process group (set -m), so a signal to this
# script's group reaches it once, through the trap below, not twice (a second SIGTERM would cut
# torchrun's graceful shutdown short); `wait` returns early when a trapped signal arrives.
set -m
"$TORCHRUN" "${args[@]}" -m cifar_dist train "$@" &
pid=$!
set +m
# shellcheck disable=SC2317  # trap handlers are invoked indirectly
forward() { kill -s "$1" "$pid" 2>/dev/null || true; }
for sig in TERM INT HUP QUIT USR1; do
  # shellcheck disable=SC2064  # expand $sig now
  trap "forward $sig" "$sig"
done
wait_launcher "torchrun.sh" "$pid" # launch/lib.sh: exits
