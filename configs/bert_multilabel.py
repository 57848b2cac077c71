"""Fine-tune an encoder for multi-label classification: any number of labels per text, micro and macro F1.

  python -m jtune.train --config=configs/bert_multilabel.py --workdir=DIR   # GoEmotions (hub), 28 emotions
  python -m jtune.train --config=configs/bert_multilabel.py:files --workdir=DIR \\
      --config.data.data_files.train=train.jsonl --config.data.data_files.validation=dev.jsonl

Data: a text column and a label column holding a list of label names (or ClassLabel ids). Variants: files
(JSON Lines with text, labels), tiny (what the tests run), lora, frozen, adafactor, and a mesh preset.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants, preset = common.split_variants(arg)
  c = common.base_config(preset)
  c.task.name = 'multi_label'
  c.data.dataset = 'google-research-datasets/go_emotions'
  c.data.dataset_config = 'simplified'
  c.data.text_column = 'text'
  c.data.label_column = 'labels'
  c.train.best_metric = 'eval_micro_f1'
  c.optim.learning_rate = 1e-4
  common.apply_variants(c, variants, 'bert_multilabel.py', {'files': common.use_files, 'tiny': common.tiny_on_files})
  return c
