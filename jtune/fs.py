"""Run folders on a local disk or in a bucket (`gs://...`, what every TPU-pod worker can reach).

`etils.epath` (which Orbax uses too) gives one Path API for both; bucket paths need `gcsfs` installed.
"""

from __future__ import annotations

import os
import tempfile

from etils import epath


def umask_mode(directory: bool = False) -> int:
  """The mode a plain open()/mkdir() would give under the user's umask (temp files default to 0600)."""
  mask = os.umask(0)
  os.umask(mask)
  return (0o777 if directory else 0o666) & ~mask


def is_local(path: str | os.PathLike) -> bool:
  return '://' not in os.fspath(path)


def path(p: str | os.PathLike) -> epath.Path:
  """A local path made absolute (with ~ expanded), or a bucket URL as it is."""
  if is_local(p):
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(p))))
  return epath.Path(os.fspath(p))


def write_text(p: str | os.PathLike, text: str) -> None:
  """`text` into `p`, whole or not at all (a kill or a full disk mid-write leaves the old file; readers never see
  half a file): locally a temporary file renamed over it, under the user's umask; a bucket object appears whole."""
  if not is_local(p):
    epath.Path(p).write_text(text)
    return
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.fspath(p)), suffix='.tmp')
  try:
    with os.fdopen(fd, 'w', encoding='utf-8', newline='') as f:
      f.write(text)
    os.chmod(tmp, umask_mode())
    os.replace(tmp, p)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
