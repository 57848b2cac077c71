#!/usr/bin/env bash
# Shared by the tpu_scripts: settings from environment variables, overridden by flags, and `run_cmd`.
#
# A script sets SCRIPT_USAGE (one line: what it does), optionally SCRIPT_FLAGS_HELP (its own flags) and a function
# `script_flag FLAG` that consumes its own flags (returns 1 for a flag it does not know), then sources this file
# and calls `parse_args "$@"`.
set -euo pipefail

TPU_NAME="${TPU_NAME:-jtune}"
TPU_ZONE="${TPU_ZONE:-us-central2-b}"
TPU_TYPE="${TPU_TYPE:-v4-32}"
TPU_VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
TPU_PROJECT="${TPU_PROJECT:-}"
TPU_BUCKET="${TPU_BUCKET:-}"
TPU_SPOT="${TPU_SPOT:-0}"
TPU_QUEUED="${TPU_QUEUED:-0}"
JTUNE_CONFIG="${JTUNE_CONFIG:-configs/bert_cls.py}"
JTUNE_RUN="${JTUNE_RUN:-run1}"
DRY_RUN=0
TRAIN_ARGS=()  # After `--`: passed on to `python -m jtune.train` (launch.sh only).
ACCEPTS_TRAIN_ARGS="${ACCEPTS_TRAIN_ARGS:-0}"
SCRIPT_NAME="$(basename "$0")"
# shellcheck disable=SC2034  # Read by setup.sh.
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() {  # die CODE MESSAGE...: one line on stderr, then exit.
  local code="$1"
  shift
  echo "tpu_scripts: error: $*" >&2
  exit "$code"
}

usage() {
  cat <<USAGE
usage: $SCRIPT_NAME [flags]$([[ "$ACCEPTS_TRAIN_ARGS" == 1 ]] && echo ' [-- jtune.train flags]')

${SCRIPT_USAGE:-}

flags (default from the environment variable named):
  --name NAME        TPU_NAME      TPU VM / queued resource name (jtune)
  --zone ZONE        TPU_ZONE      zone (us-central2-b)
  --type TYPE        TPU_TYPE      accelerator type (v4-32)
  --version VERSION  TPU_VERSION   TPU runtime version (tpu-ubuntu2204-base)
  --project PROJECT  TPU_PROJECT   Google Cloud project (gcloud's default when unset)
  --bucket BUCKET    TPU_BUCKET    GCS bucket for workdirs, without gs:// (launch.sh needs it)
  --config PATH      JTUNE_CONFIG  jtune config, relative to the repo (configs/bert_cls.py)
  --run NAME         JTUNE_RUN     run name: workdir gs://BUCKET/RUN, log ~/jtune-RUN.log (run1)
  --spot             TPU_SPOT=1    spot capacity
  --queued           TPU_QUEUED=1  a queued resource instead of a direct create (create.sh, delete.sh)
  --dry-run                        print the gcloud commands, one per line, and run nothing
  -h, --help                       this help
${SCRIPT_FLAGS_HELP:-}
USAGE
}

parse_args() {
  local flag value
  while (($#)); do
    flag="$1"
    value=""
    if [[ "$flag" == --*=* ]]; then
      value="${flag#*=}"
      flag="${flag%%=*}"
    fi
    case "$flag" in
      --name | --zone | --type | --version | --project | --bucket | --config | --run)
        if [[ "$1" != *=* ]]; then
          (($# >= 2)) || die 2 "flag $flag needs a value (see --help)"
          value="$2"
          shift
        fi
        [[ -n "$value" ]] || die 2 "flag $flag needs a non-empty value (see --help)"
        case "$flag" in
          --name) TPU_NAME="$value" ;;
          --zone) TPU_ZONE="$value" ;;
          --type) TPU_TYPE="$value" ;;
          --version) TPU_VERSION="$value" ;;
          --project) TPU_PROJECT="$value" ;;
          --bucket) TPU_BUCKET="${value#gs://}" ;;
          --config) JTUNE_CONFIG="$value" ;;
          --run) JTUNE_RUN="$value" ;;
        esac
        ;;
      --spot) TPU_SPOT=1 ;;
      --queued) TPU_QUEUED=1 ;;
      --dry-run) DRY_RUN=1 ;;
      -h | --help)
        usage
        exit 0
        ;;
      --)
        shift
        if (($#)) && [[ "$ACCEPTS_TRAIN_ARGS" != 1 ]]; then
          die 2 "$SCRIPT_NAME takes no arguments after -- (only launch.sh passes them to jtune.train)"
        fi
        # shellcheck disable=SC2034  # Read by launch.sh.
        TRAIN_ARGS=("$@")
        break
        ;;
      -*)
        if ! { declare -F script_flag >/dev/null && script_flag "$1"; }; then
          die 2 "unknown flag $flag (see --help)"
        fi
        ;;
      *) die 2 "unexpected argument $1 (see --help)" ;;
    esac
    shift
  done
  TPU_BUCKET="${TPU_BUCKET#gs://}"
  TPU_BUCKET="${TPU_BUCKET%/}"
  # The run name becomes a GCS folder and a log file name on every worker: keep it to safe characters.
  [[ "$JTUNE_RUN" =~ ^[A-Za-z0-9._-]+$ ]] || die 2 "--run $JTUNE_RUN: expected letters, digits, '.', '_' or '-'"
}

require_bucket() {
  [[ -n "$TPU_BUCKET" ]] || die 2 "$SCRIPT_NAME needs --bucket BUCKET (or TPU_BUCKET): the workdir is gs://BUCKET/RUN"
}

# Sets PROJECT_FLAGS (--project=P when a project is set, else empty) and LOCATION_FLAGS (--zone=Z and those).
# Expand a possibly empty array as ${A[@]+"${A[@]}"}: bash before 4.4 (macOS) rejects "${A[@]}" under set -u.
location_flags() {
  PROJECT_FLAGS=()
  if [[ -n "$TPU_PROJECT" ]]; then
    PROJECT_FLAGS=(--project="$TPU_PROJECT")
  fi
  LOCATION_FLAGS=(--zone="$TPU_ZONE" ${PROJECT_FLAGS[@]+"${PROJECT_FLAGS[@]}"})
}

# Prints the command shell-quoted on one line; a dry run stops there, otherwise it is echoed to stderr and run.
run_cmd() {
  local quoted
  quoted="$(printf '%q ' "$@")"
  quoted="${quoted% }"
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%s\n' "$quoted"
    return 0
  fi
  printf '+ %s\n' "$quoted" >&2
  "$@"
}

# tpu_ssh WORKER COMMAND: runs COMMAND (a remote shell line) on one worker or `all` of them.
tpu_ssh() {
  location_flags
  run_cmd gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION_FLAGS[@]}" --worker="$1" --command="$2"
}

# The remote line that streams a run's log on the worker it runs on (logs.sh, launch.sh).
follow_log_command() {
  printf 'tail -n +1 -F ~/jtune-%s.log' "$JTUNE_RUN"
}
