"""Fine-tune an encoder for extractive question answering (SQuAD v1.1): exact match and F1.

  python -m jtune.train --config=configs/bert_qa.py --workdir=DIR            # SQuAD v1.1 (hub)
  python -m jtune.train --config=configs/bert_qa.py:files --workdir=DIR \\
      --config.data.data_files.train=train.jsonl --config.data.data_files.validation=dev.jsonl

Data as SQuAD has it: question, context, answers {'text': [...], 'answer_start': [...]}. Contexts longer than
max_length become windows overlapping by task.stride tokens. Variants: files, tiny (what the tests run), lora,
frozen, adafactor, and a mesh preset.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants, preset = common.split_variants(arg)
  c = common.base_config(preset)
  c.task.name = 'qa'
  c.data.dataset = 'squad'
  c.data.text_column = 'question'
  c.data.text_pair_column = 'context'
  c.data.label_column = 'answers'
  c.data.max_length = 384
  c.data.buckets = (128, 256, 384)
  c.task.stride = 128
  c.train.batch_size = 16
  c.train.eval_batch_size = 32
  c.train.num_epochs = 2
  c.train.best_metric = 'eval_f1'
  c.optim.learning_rate = 5e-5
  common.apply_variants(c, variants, 'bert_qa.py', {'files': common.use_files, 'tiny': _tiny})
  return c


def _tiny(c: ml_collections.ConfigDict) -> None:
  common.tiny_on_files(c)
  c.data.max_length = 64
  c.data.buckets = (32, 64)
  c.task.stride = 16
