#!/usr/bin/env bash
# Deletes the TPU VM, or with --queued the queued resource and its node.
SCRIPT_USAGE="Deletes the TPU VM NAME, or with --queued the queued resource NAME (and its VM), without asking."
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
location_flags
if [[ "$TPU_QUEUED" == 1 ]]; then
  run_cmd gcloud compute tpus queued-resources delete "$TPU_NAME" "${LOCATION_FLAGS[@]}" --force --quiet
else
  run_cmd gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION_FLAGS[@]}" --quiet
fi
