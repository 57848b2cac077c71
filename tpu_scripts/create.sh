#!/usr/bin/env bash
# Creates the TPU VM (all its workers), directly or through a queued resource that it waits on.
SCRIPT_USAGE="Creates the TPU VM NAME: 'tpu-vm create', or with --queued a queued resource, waiting until ACTIVE."
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
location_flags

POLL_SECONDS="${TPU_POLL_SECONDS:-30}"

wait_until_active() {
  local state
  while true; do
    state="$(gcloud compute tpus queued-resources describe "$TPU_NAME" "${LOCATION_FLAGS[@]}" \
      --format='value(state.state)')"
    case "$state" in
      ACTIVE)
        echo "tpu_scripts: queued resource $TPU_NAME is ACTIVE" >&2
        return 0
        ;;
      FAILED | SUSPENDED)
        die 1 "queued resource $TPU_NAME is $state" \
          "(see: gcloud compute tpus queued-resources describe $TPU_NAME --zone=$TPU_ZONE)"
        ;;
    esac
    echo "tpu_scripts: queued resource $TPU_NAME is ${state:-UNKNOWN}; checking again in ${POLL_SECONDS}s" >&2
    sleep "$POLL_SECONDS"
  done
}

spot=()
if [[ "$TPU_SPOT" == 1 ]]; then
  spot=(--spot)
fi

if [[ "$TPU_QUEUED" == 1 ]]; then
  run_cmd gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" --zone="$TPU_ZONE" \
    --accelerator-type="$TPU_TYPE" --runtime-version="$TPU_VERSION" ${spot[@]+"${spot[@]}"} \
    ${PROJECT_FLAGS[@]+"${PROJECT_FLAGS[@]}"}
  if [[ "$DRY_RUN" != 1 ]]; then
    wait_until_active
  fi
else
  run_cmd gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$TPU_ZONE" --accelerator-type="$TPU_TYPE" \
    --version="$TPU_VERSION" ${spot[@]+"${spot[@]}"} \
    ${PROJECT_FLAGS[@]+"${PROJECT_FLAGS[@]}"}
fi
