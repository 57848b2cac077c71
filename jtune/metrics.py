"""Metric sinks: workdir/metrics.jsonl and TensorBoard event files (tensorboardX, no TensorFlow)."""

from __future__ import annotations

import json
from typing import Mapping

import tensorboardX

from jtune import fs


def _step(line: str) -> float:
  """The record's step; infinity (dropped on resume) for a blank or broken line: the half-written last line of a
  run killed mid-write, or of a full disk."""
  try:
    return json.loads(line)['step']
  except (ValueError, KeyError, TypeError):
    return float('inf')


class MetricWriter:
  """Appends one JSON object per call to metrics.jsonl and mirrors scalars to TensorBoard.

  Only process 0 should own a writer; other processes pass `enabled=False`.
  """

  def __init__(self, workdir: str | fs.epath.Path, enabled: bool = True, resume_step: int = 0):
    """`resume_step`: drop records past it, logged by a run that died before its next checkpoint."""
    self.enabled = enabled
    if not enabled:
      return
    workdir = fs.path(workdir)
    self._path = workdir / 'metrics.jsonl'
    self._lines = []
    if self._path.exists():
      self._lines = [line + '\n' for line in self._path.read_text(encoding='utf-8').splitlines()
                     if _step(line) <= resume_step]
      staging = self._path.with_name(self._path.name + '.tmp')  # a kill while rewriting keeps the old file
      staging.write_text(''.join(self._lines), encoding='utf-8')
      staging.replace(self._path)
    # A local file is appended to; a bucket object cannot be, so it is rewritten whole (metrics are small).
    self._jsonl = open(self._path, 'a', encoding='utf-8') if fs.is_local(self._path) else None
    self._tb = tensorboardX.SummaryWriter(str(workdir / 'tensorboard'))

  def write(self, step: int, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), **{k: float(v) for k, v in values.items()}}
    line = json.dumps(record) + '\n'
    if self._jsonl is None:
      self._lines.append(line)
      self._path.write_text(''.join(self._lines), encoding='utf-8')
    else:
      self._jsonl.write(line)
      self._jsonl.flush()
    for name, value in values.items():
      self._tb.add_scalar(name, float(value), int(step))

  def close(self) -> None:
    if self.enabled:
      if self._jsonl is not None:
        self._jsonl.close()
      self._tb.close()
