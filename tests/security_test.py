"""Security basics: nothing on the load path unpickles, nothing goes online unasked, files follow the umask."""

import os
import pathlib
import re
import stat
import subprocess
import sys

import pytest

from tests import cli

JTUNE = cli.ROOT / 'jtune'


def _sources():
  return sorted(JTUNE.rglob('*.py'))


@pytest.mark.parametrize('pattern', [r'\bimport pickle\b', r'\bpickle\.', r'torch\.load', r'allow_pickle\s*=\s*True',
                                     r'\bcloudpickle\b', r'\bdill\b', r'\beval\(', r'\bexec\('])
def test_no_unpickling_or_code_execution_on_the_load_path(pattern):
  # jtune/executables.py reads back the compiled steps jtune itself wrote under cache_dir (JAX's serialized
  # executables are pickles of native code, as trusted as JAX's persistent cache beside them); nothing that comes
  # from a model, a checkpoint or a dataset goes through it
  trusted = {'jtune/executables.py'}
  hits = [f'{p.relative_to(cli.ROOT)}:{i + 1}' for p in _sources() if str(p.relative_to(cli.ROOT)) not in trusted
          for i, line in enumerate(p.read_text().splitlines()) if re.search(pattern, line)]
  assert not hits, hits


def test_network_only_through_fetch_and_the_hub_paths():
  """Only fetch.py (pip download of a `pypi:` spec) and the hub fallbacks in hf/io.py and data/pipeline.py
  may reach the network, and the hub only for a name that is not a local folder."""
  network = re.compile(r'\b(urllib|requests|httpx|socket|http\.client|pip)\b')
  # jtune.serve answers HTTP requests on the address it is given: it listens, and opens no connection itself
  server = {'serve.py', 'serving.py'}
  allowed = {'fetch.py'} | server
  hits = [str(p.relative_to(cli.ROOT)) for p in _sources()
          if p.name not in allowed and network.search(p.read_text())]
  assert not hits, hits
  client = re.compile(r'^\s*(import|from)\s+(urllib|requests|httpx|socket|http\.client)\b', re.M)
  assert not [p.name for p in _sources() if p.name in server and client.search(p.read_text())]


def test_written_files_follow_the_umask(tmp_path, cache_dir):
  workdir, cache = tmp_path / 'run', tmp_path / 'cache'
  cache.mkdir()
  (cache / 'pypi').symlink_to(pathlib.Path(cache_dir) / 'pypi')  # fetched files; corpora are prepared anew
  proc = subprocess.run(
      [sys.executable, '-m', 'jtune.train', *cli.TINY, f'--workdir={workdir}', f'--config.cache_dir={cache}',
       '--config.train.num_steps=2'],
      cwd=cli.ROOT, env=cli.env(), capture_output=True, text=True, timeout=600, check=False,
      preexec_fn=lambda: os.umask(0o027))
  assert proc.returncode == 0, proc.stderr[-3000:]
  paths = [p for root in (workdir, cache / 'data', cache / 'executables') for p in root.rglob('*')]
  assert any(p.name == 'model.safetensors' for p in paths) and any(p.name == 'train.csv' for p in paths)
  assert any(p.suffix == '.exe' for p in paths)  # the compiled steps (jtune/executables.py)
  for p in paths:
    mode = stat.S_IMODE(p.stat().st_mode)
    expected = 0o750 if p.is_dir() else 0o640
    assert mode & ~expected == 0, f'{p}: {oct(mode)} grants more than the umask 027 allows'
    assert mode & 0o600 == 0o600, f'{p}: {oct(mode)} is not readable and writable by its owner'
    if p.parent.name == 'export' or p.name == 'train.csv':
      assert mode == expected, f'{p}: {oct(mode)} instead of {oct(expected)}'
