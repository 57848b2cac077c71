"""Small JSON Lines datasets for the task tests, with patterns a tiny model can pick up in a few steps.

Hand-made in the shape of the real datasets (STS-B, GoEmotions, CoNLL-2003, SQuAD), written fresh for each test.
"""

import json
import pathlib

import numpy as np

NAMES = ['Alice Smith', 'Bob', 'Carol Jones', 'Dmitri', 'Erin Walsh', 'Farah', 'George Miller', 'Hana']
CITIES = ['Paris', 'New York', 'Lima', 'Oslo', 'Cape Town', 'Kyoto', 'Rome', 'Buenos Aires']
WORDS = ['film', 'plot', 'music', 'cast', 'story', 'scene', 'ending', 'actor', 'script', 'camera']
TOPICS = {'sport': ['match', 'goal', 'team'], 'money': ['bank', 'price', 'market'], 'art': ['paint', 'museum', 'song']}


def _write(path: pathlib.Path, rows: list[dict]) -> str:
  path.write_text(''.join(json.dumps(row) + '\n' for row in rows), encoding='utf-8')
  return str(path)


def _splits(folder: pathlib.Path, make, n_train: int, n_eval: int) -> dict[str, str]:
  rng = np.random.default_rng(0)
  return {'train': _write(folder / 'train.jsonl', [make(rng) for _ in range(n_train)]),
          'validation': _write(folder / 'validation.jsonl', [make(rng) for _ in range(n_eval)])}


def regression(folder: pathlib.Path, n_train=256, n_eval=64) -> dict[str, str]:
  """sentence1, sentence2, label: 5 x the share of sentence1's words that sentence2 repeats."""
  def make(rng):
    first = list(rng.choice(WORDS, 5, replace=False))
    shared = int(rng.integers(0, 6))
    second = first[:shared] + list(rng.choice([w for w in WORDS if w not in first], 5 - shared, replace=False))
    return {'sentence1': ' '.join(first), 'sentence2': ' '.join(rng.permutation(second)), 'label': float(shared)}
  return _splits(folder, make, n_train, n_eval)


def multi_label(folder: pathlib.Path, n_train=256, n_eval=64) -> dict[str, str]:
  """text, labels: the topics whose words the text contains (none, one or several)."""
  def make(rng):
    labels = sorted(t for t in TOPICS if rng.random() < 0.4)
    words = [w for t in labels for w in rng.choice(TOPICS[t], 2)] + list(rng.choice(WORDS, 3))
    return {'text': ' '.join(rng.permutation(words)), 'labels': labels}
  return _splits(folder, make, n_train, n_eval)


def ner(folder: pathlib.Path, n_train=256, n_eval=64) -> dict[str, str]:
  """tokens, ner_tags (IOB2): person and city names in a few sentence shapes."""
  def make(rng):
    name, city = str(rng.choice(NAMES)).split(), str(rng.choice(CITIES)).split()
    tag = lambda words, kind: [f'B-{kind}'] + [f'I-{kind}'] * (len(words) - 1)  # noqa: E731
    if rng.random() < 0.5:
      tokens = name + ['moved', 'to'] + city + ['.']
      tags = tag(name, 'PER') + ['O', 'O'] + tag(city, 'LOC') + ['O']
    else:
      tokens = ['In'] + city + [',', 'the', str(rng.choice(WORDS)), 'pleased'] + name + ['.']
      tags = ['O'] + tag(city, 'LOC') + ['O', 'O', 'O', 'O'] + tag(name, 'PER') + ['O']
    return {'tokens': tokens, 'ner_tags': tags}
  return _splits(folder, make, n_train, n_eval)


def qa(folder: pathlib.Path, n_train=256, n_eval=48) -> dict[str, str]:
  """question, context, answers (SQuAD layout): where someone lives, in a context of filler sentences long
  enough to need several windows."""
  def make(rng):
    name, city = str(rng.choice(NAMES)), str(rng.choice(CITIES))
    filler = [f'The {w} was {v}.' for w, v in zip(rng.choice(WORDS, 6), rng.choice(['long', 'fine', 'odd'], 6))]
    fact = f'{name} lives in {city}.'
    position = int(rng.integers(0, len(filler) + 1))
    context = ' '.join(filler[:position] + [fact] + filler[position:])
    start = context.index(fact) + len(f'{name} lives in ')
    return {'question': f'Where does {name} live?', 'context': context,
            'answers': {'text': [city], 'answer_start': [start]}}
  return _splits(folder, make, n_train, n_eval)
