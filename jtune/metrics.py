"""Metric sinks: workdir/metrics.jsonl and TensorBoard event files (tensorboardX, no TensorFlow)."""

from __future__ import annotations

import json
import pathlib
from typing import Mapping

import tensorboardX


class MetricWriter:
  """Appends one JSON object per call to metrics.jsonl and mirrors scalars to TensorBoard.

  Only process 0 should own a writer; other processes pass `enabled=False`.
  """

  def __init__(self, workdir: str | pathlib.Path, enabled: bool = True, resume_step: int = 0):
    """`resume_step`: drop records past it, logged by a run that died before its next checkpoint."""
    self.enabled = enabled
    if not enabled:
      return
    workdir = pathlib.Path(workdir)
    path = workdir / 'metrics.jsonl'
    if path.exists():
      kept = [line for line in path.read_text(encoding='utf-8').splitlines()
              if line.strip() and json.loads(line)['step'] <= resume_step]
      path.write_text(''.join(line + '\n' for line in kept), encoding='utf-8')
    self._jsonl = open(path, 'a', encoding='utf-8')
    self._tb = tensorboardX.SummaryWriter(str(workdir / 'tensorboard'))

  def write(self, step: int, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), **{k: float(v) for k, v in values.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    for name, value in values.items():
      self._tb.add_scalar(name, float(value), int(step))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
