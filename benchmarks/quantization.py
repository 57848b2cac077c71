"""What int8 weight-only weights change: accuracy on a split and the time of a prediction call.

  python -m benchmarks.quantization --config=configs/bert_cls.py --model=/tmp/run1/export

Scores the export with float32 and with int8 weights (jtune/models/quantize.py) on the config's eval split,
then times `--repeats` calls on a batch of `--batch` texts of each, alternating, and prints one JSON line:
accuracies, the largest probability change, weight bytes, median call times.
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jtune import config as config_lib
from jtune import serving
from jtune.data import pipeline
from jtune.models import quantize

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file[:variant]: the data.', lock_config=True)
_MODEL = flags.DEFINE_string('model', None, 'An exported sequence classifier.')
_BATCH = flags.DEFINE_integer('batch', 32, 'Texts per timed call.')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Timed calls of each.')


def main(argv):
  del argv
  cfg = config_lib.from_config_dict(_CONFIG.value)
  _, ds = pipeline.load_splits(cfg.data)
  texts = list(ds[cfg.data.text_column])
  limits = serving.Limits(max_batch_size=_BATCH.value, max_length=cfg.data.max_length, buckets=cfg.data.buckets)
  predictors = {w: serving.Predictor(_MODEL.value, cfg.cache_dir, limits, w) for w in ('float32', 'int8')}
  labels = pipeline.encode_labels(ds, cfg.data.eval_split, cfg.data.label_column, predictors['float32'].labels)
  probs = {w: np.concatenate([p.probabilities(texts[i:i + _BATCH.value]) for i in range(0, len(texts), _BATCH.value)])
           for w, p in predictors.items()}
  batch = texts[:_BATCH.value]
  times = {w: [] for w in predictors}
  for _ in range(_REPEATS.value):
    for w, p in predictors.items():
      start = time.perf_counter()
      p.probabilities(batch)
      times[w].append(time.perf_counter() - start)
  print(json.dumps({
      'examples': len(texts),
      'accuracy': {w: float(np.mean(p.argmax(1) == labels)) for w, p in probs.items()},
      'predictions_changed': int(np.sum(probs['float32'].argmax(1) != probs['int8'].argmax(1))),
      'max_probability_change': float(np.abs(probs['float32'] - probs['int8']).max()),
      'weight_bytes': {w: quantize.nbytes(p.params) for w, p in predictors.items()},
      'call_s_median': {w: statistics.median(t) for w, t in times.items()},
      'batch': _BATCH.value,
  }), flush=True)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'model'])
  app.run(main)
