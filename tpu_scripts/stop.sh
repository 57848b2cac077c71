#!/usr/bin/env bash
# Stops training on every worker. Checkpoints already in gs://BUCKET/RUN stay; launching again resumes.
SCRIPT_USAGE="Kills jtune.train on every worker; a later launch.sh with the same --run resumes from its checkpoint."
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
# '[j]tune[.]train' matches the training processes but not the remote shell whose command line holds this pattern.
tpu_ssh all "pkill -f '[j]tune[.]train' || true"
