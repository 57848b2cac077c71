#!/usr/bin/env bash
# Streams worker 0's training log (from its first line; Ctrl-C stops following, not the run).
SCRIPT_USAGE="Streams the log of run RUN from worker 0 (Ctrl-C stops following, not training)."
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
tpu_ssh 0 "$(follow_log_command)"
