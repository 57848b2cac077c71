#!/usr/bin/env bash
# Installs this checkout of jtune on every worker: ~/jtune with its own virtual environment in ~/jtune/.venv.
SCRIPT_USAGE="Copies this checkout to ~/jtune on every worker and installs it with jax[tpu] and gcsfs in ~/jtune/.venv.
The venv's Python is JTUNE_PYTHON (3.12), installed by uv: the TPU VM images ship Python 3.10, too old for jax."
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
location_flags

JTUNE_PYTHON="${JTUNE_PYTHON:-3.12}"
[[ "$JTUNE_PYTHON" =~ ^[0-9.]+$ ]] || die 2 "JTUNE_PYTHON=$JTUNE_PYTHON: expected a version such as 3.12"
REMOTE_TARBALL="jtune-src.tar.gz"

# build_tarball OUT: the checkout as it is on disk (uncommitted edits and new files included, .git, .venv and
# git-ignored files left out); without git, every file but .git, .venv and caches.
build_tarball() {
  local out="$1" path
  if git -C "$REPO_ROOT" rev-parse --show-toplevel >/dev/null 2>&1 \
    && [[ "$(cd "$(git -C "$REPO_ROOT" rev-parse --show-toplevel)" && pwd)" == "$REPO_ROOT" ]]; then
    (
      cd "$REPO_ROOT" || exit 1
      git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' path; do
        # Files deleted but not yet committed are still in the index: skip what is not on disk.
        if [[ -e "$path" && "$path" != .venv/* && "$path" != .git/* ]]; then
          printf '%s\0' "$path"
        fi
      done | tar -czf "$out" --null -T -
    )
  else
    tar -czf "$out" -C "$REPO_ROOT" --exclude=./.git --exclude=./.venv --exclude=__pycache__ .
  fi
}

if [[ "$DRY_RUN" == 1 ]]; then
  tarball="${TMPDIR:-/tmp}/$REMOTE_TARBALL"  # Not built in a dry run.
else
  tmp_dir="$(mktemp -d)"
  trap 'rm -rf "$tmp_dir"' EXIT
  tarball="$tmp_dir/$REMOTE_TARBALL"
  build_tarball "$tarball"
fi

# Replaces everything in ~/jtune but .venv, so a second setup updates the code without reinstalling jax.
remote_setup="mkdir -p ~/jtune \
&& find ~/jtune -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} + \
&& tar -xzf ~/$REMOTE_TARBALL -C ~/jtune && rm -f ~/$REMOTE_TARBALL && cd ~/jtune \
&& export PATH=\"\$HOME/.local/bin:\$PATH\" \
&& { command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; } \
&& { test -x .venv/bin/python || uv venv --seed --python $JTUNE_PYTHON .venv; } \
&& source .venv/bin/activate \
&& pip install -U 'jax[tpu]' gcsfs && pip install -e ~/jtune"

run_cmd gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:$REMOTE_TARBALL" --worker=all "${LOCATION_FLAGS[@]}"
tpu_ssh all "$remote_setup"
