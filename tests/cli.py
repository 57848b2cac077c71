"""Running jtune's command line from tests: one process, or several that form one JAX run on 127.0.0.1."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ['--config=configs/bert_cls.py:tiny']
# Tests compile with LLVM at -O1 instead of XLA's default -O3: the same programs, compiled 2-3x faster for the
# tiny test models (-O3's loop passes dominate their compile time) and run about 8% slower on MiniLM-L6.
COMPILE_FLAGS = '--xla_backend_optimization_level=1'


def env(devices: int = 8) -> dict[str, str]:
  out = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices} {COMPILE_FLAGS}',
         'JAX_PLATFORMS': 'cpu', 'PYTHONUNBUFFERED': '1'}
  out.pop('JTUNE_TRACEBACK', None)
  return out


def run_cli(module: str, *args: str, check: bool = True, devices: int = 8) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, env=env(devices),
                        capture_output=True, text=True, timeout=600, check=False)
  if check and proc.returncode != 0:
    raise AssertionError(f'{module} {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
  return proc


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(args: list[str], processes: int = 1, heartbeat_s: int = 10) -> list[subprocess.Popen]:
  """Starts `processes` copies of `python -m jtune.train ARGS`, each with 8 / processes fake devices."""
  common = [sys.executable, '-m', 'jtune.train', *args]
  if processes == 1:
    return [subprocess.Popen(common, cwd=ROOT, env=env(8), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)]
  port = free_port()
  return [subprocess.Popen(
      common + [f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={processes}',
                f'--process_id={i}', f'--heartbeat_timeout_s={heartbeat_s}'],
      cwd=ROOT, env=env(8 // processes), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(processes)]


def wait(procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
  """Waits for every process; fails with the stderr of the first that exited non-zero."""
  errs = []
  for i, proc in enumerate(procs):
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f'process {i} failed ({proc.returncode}):\n{err[-4000:]}'
    errs.append(err)
  return errs


def read_jsonl(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]
