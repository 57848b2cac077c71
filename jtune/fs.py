"""Run folders on a local disk or in a bucket (`gs://...`, what every TPU-pod worker can reach).

`etils.epath` (which Orbax uses too) gives one Path API for both; bucket paths need `gcsfs` installed.
"""

from __future__ import annotations

import os

from etils import epath


def is_local(path: str | os.PathLike) -> bool:
  return '://' not in os.fspath(path)


def path(p: str | os.PathLike) -> epath.Path:
  """A local path made absolute (with ~ expanded), or a bucket URL as it is."""
  if is_local(p):
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(p))))
  return epath.Path(os.fspath(p))
