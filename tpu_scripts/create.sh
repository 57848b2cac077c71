#!/usr/bin/env bash
# Creates the TPU VM (all its workers), directly or through a queued resource that it waits on.
SCRIPT_USAGE="Creates the TPU VM NAME: 'tpu-vm create', or with --queued a queued resource, waiting until ACTIVE."
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
location_flags

POLL_SECONDS="${TPU_POLL_SECONDS:-30}"
WAIT_SECONDS="${TPU_WAIT_SECONDS:-0}"            # 0: wait on the queued resource as long as it takes
DESCRIBE_RETRIES="${TPU_DESCRIBE_RETRIES:-5}"    # failed `describe` calls in a row before giving up
for setting in POLL_SECONDS WAIT_SECONDS DESCRIBE_RETRIES; do
  [[ "${!setting}" =~ ^(0|[1-9][0-9]*)$ ]] || die 2 "TPU_$setting=${!setting}: expected a whole number of seconds or tries"
done

describe_state() {  # the queued resource's state; non-zero status when gcloud fails
  gcloud compute tpus queued-resources describe "$TPU_NAME" "${LOCATION_FLAGS[@]}" --format='value(state.state)'
}

wait_until_active() {
  local state failures=0 start=$SECONDS
  while true; do
    if state="$(describe_state)"; then
      failures=0
    else  # a transient error (network, quota on the API) is retried; a lasting one ends the wait
      failures=$((failures + 1))
      ((failures < DESCRIBE_RETRIES)) ||
        die 1 "could not read the state of queued resource $TPU_NAME ($failures tries in a row)" \
          "(see: gcloud compute tpus queued-resources describe $TPU_NAME --zone=$TPU_ZONE)"
      state="UNREADABLE"
    fi
    case "$state" in
      ACTIVE)
        echo "tpu_scripts: queued resource $TPU_NAME is ACTIVE" >&2
        return 0
        ;;
      FAILED | SUSPENDED)
        die 1 "queued resource $TPU_NAME is $state" \
          "(see: gcloud compute tpus queued-resources describe $TPU_NAME --zone=$TPU_ZONE)"
        ;;
      DELETING)  # an earlier one on its way out (delete.sh --queued): it never becomes ACTIVE
        die 1 "queued resource $TPU_NAME is being deleted; rerun create.sh --queued once it is gone" \
          "(see: gcloud compute tpus queued-resources list --zone=$TPU_ZONE)"
        ;;
    esac
    if ((WAIT_SECONDS > 0 && SECONDS - start >= WAIT_SECONDS)); then
      die 1 "queued resource $TPU_NAME is still ${state:-UNKNOWN} after ${WAIT_SECONDS}s (TPU_WAIT_SECONDS);" \
        "it stays queued: rerun create.sh --queued to wait again, or delete.sh --queued to give it up"
    fi
    echo "tpu_scripts: queued resource $TPU_NAME is ${state:-UNKNOWN}; checking again in ${POLL_SECONDS}s" >&2
    sleep "$POLL_SECONDS"
  done
}

spot=()
if [[ "$TPU_SPOT" == 1 ]]; then
  spot=(--spot)
fi

if [[ "$TPU_QUEUED" == 1 ]]; then
  create_errors="$(mktemp)"
  trap 'rm -f "$create_errors"' EXIT
  create_status=0
  run_cmd gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" --zone="$TPU_ZONE" \
    --accelerator-type="$TPU_TYPE" --runtime-version="$TPU_VERSION" ${spot[@]+"${spot[@]}"} \
    ${PROJECT_FLAGS[@]+"${PROJECT_FLAGS[@]}"} 2>"$create_errors" || create_status=$?
  cat "$create_errors" >&2
  if ((create_status != 0)); then
    # a rerun (after a cut-off wait, say): the resource asked for earlier is waited on, not asked for again; any
    # other refusal (quota, a bad type or zone, permissions) ends here
    grep -qiE 'ALREADY_EXISTS|already exists' "$create_errors" ||
      die 1 "could not create queued resource $TPU_NAME (gcloud's error above)"
    echo "tpu_scripts: queued resource $TPU_NAME exists already; waiting on it" >&2
  fi
  if [[ "$DRY_RUN" != 1 ]]; then
    wait_until_active
  fi
else
  run_cmd gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$TPU_ZONE" --accelerator-type="$TPU_TYPE" \
    --version="$TPU_VERSION" ${spot[@]+"${spot[@]}"} \
    ${PROJECT_FLAGS[@]+"${PROJECT_FLAGS[@]}"}
fi
