# launch/lib.sh: sourced by launch/torchrun.sh and launch/deepspeed.sh (not run on its own).
# Both run their launcher in the background and forward signals to it through traps; this is
# the shared end: wait for it and map a checkpointed pre-emption to exit code 75. Before that,
# check_config loads the config once.

# shellcheck disable=SC2034  # used by the sourcing scripts
PREEMPTED_EXIT_CODE=75 # EX_TEMPFAIL: requeue on 75, investigate anything else non-zero

# check_config PYTHON ARGS...: load the run config from the `cifar-dist train` arguments without
# training (--print-config; ~4 s, a torch import). A bad key or value prints its one line and the
# script exits with its code (2) here, instead of every rank printing it and the launcher adding
# its own traceback. CHECK_CONFIG=0 skips it.
check_config() {
  local py=$1 rc=0
  shift
  [[ ${CHECK_CONFIG:-1} == 0 ]] && return 0
  "$py" -m cifar_dist train --print-config "$@" >/dev/null || rc=$?
  ((rc == 0)) || exit "$rc"
}

# new_preempt_marker: a fresh path for the marker each node's local rank 0 writes after the
# pre-emption checkpoint (cifar_dist/train/preemption.py); exported to the workers.
new_preempt_marker() {
  marker=$(mktemp "${TMPDIR:-/tmp}/cifar-dist-preempt.XXXXXX")
  rm -f "$marker"
  export CIFAR_DIST_PREEMPT_MARKER=$marker
}

# wait_launcher NAME PID: wait for the launcher (a trapped signal makes `wait` return early:
# wait again while it lives), then exit with its code, or 75 when the marker says the run was
# pre-empted after a checkpoint (launchers report 1 for any failed worker).
wait_launcher() {
  local name=$1 pid=$2 rc
  while :; do
    rc=0
    wait "$pid" || rc=$?
    if ((rc > 128)) && kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  if ((rc != 0)) && [[ -f $marker ]]; then
    echo "$name: pre-empted after a checkpoint ($(cat "$marker")); exit $PREEMPTED_EXIT_CODE" \
      "(resume with --train.resume=auto)" >&2
    rc=$PREEMPTED_EXIT_CODE
  fi
  rm -f "$marker"
  exit "$rc"
}
