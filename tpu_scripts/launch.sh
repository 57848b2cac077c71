#!/usr/bin/env bash
# Starts `python -m jtune.train` on every worker of the pod, then follows worker 0's log.
SCRIPT_USAGE="Starts python -m jtune.train on every worker (workdir gs://BUCKET/RUN, log ~/jtune-RUN.log on each),
then streams worker 0's log. jtune starts jax.distributed itself on a TPU VM: no coordinator flags."
SCRIPT_FLAGS_HELP="launch.sh flags:
  --no-follow                      start training and return, without streaming the log (logs.sh streams it)
  -- ARGS                          passed on to jtune.train, e.g. -- --config.train.num_epochs=1"
ACCEPTS_TRAIN_ARGS=1
FOLLOW=1
script_flag() {
  case "$1" in
    --no-follow) FOLLOW=0 ;;
    *) return 1 ;;
  esac
}
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
require_bucket

train=(python -m jtune.train --config="$JTUNE_CONFIG" --workdir="gs://$TPU_BUCKET/$JTUNE_RUN"
  ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
train_line="$(printf '%q ' "${train[@]}")"
# nohup and every standard stream redirected: training outlives the ssh session, which returns at once. Only the
# training goes to the background: a worker without the checkout or its venv fails the ssh command.
tpu_ssh all "cd ~/jtune && source .venv/bin/activate \
&& { nohup ${train_line}> ~/jtune-$JTUNE_RUN.log 2>&1 < /dev/null & }"

if [[ "$FOLLOW" == 1 ]]; then
  tpu_ssh 0 "$(follow_log_command)"
fi
