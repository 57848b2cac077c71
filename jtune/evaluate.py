"""Entry point: python -m jtune.evaluate --config=configs/bert_cls.py --model=EXPORT [--model=EXPORT ...] --out=DIR

Scores exported sequence classifiers (jtune exports, or any Hugging Face *ForSequenceClassification folder)
on a split of the config's dataset. Several models form an ensemble: its prediction is the mean of their class
probabilities. Every model keeps its own tokenizer, so a BERT and a RoBERTa can vote together; they must share
the label set. Writes DIR/report.json (the ensemble's and each model's metrics, per-class precision, recall,
F1 and support, the confusion matrix), DIR/report.md and DIR/confusion.png, and prints the ensemble's metrics
as one JSON line.
"""

from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

from jtune import config as config_lib
from jtune import ensemble, errors, report

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file[:variant]: the data.', lock_config=True)
_MODEL = flags.DEFINE_multi_string('model', None, 'An exported classifier; repeat the flag for an ensemble.')
_SPLIT = flags.DEFINE_string('split', None, "The split to score (default: the config's data.eval_split).")
_OUT = flags.DEFINE_string('out', None, 'Folder for report.json, report.md and confusion.png.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  errors.quiet_libraries()
  with errors.one_line():
    cfg = config_lib.from_config_dict(_CONFIG.value)
    result = ensemble.evaluate(cfg, _MODEL.value or [], _SPLIT.value)
    report.write(result, os.path.expanduser(_OUT.value))
  summary = {k: v for k, v in result['ensemble'].items() if k not in ('per_class', 'confusion')}
  print(json.dumps(summary), flush=True)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'model', 'out'])
  app.run(main, flags_parser=errors.parse_flags)
