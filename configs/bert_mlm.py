"""Domain-adaptive pretraining: continue BERT's masked-LM training on unlabelled in-domain text, then fine-tune.

  python -m jtune.train --config=configs/bert_mlm.py --workdir=/tmp/dapt             # MLM on polarity's text
  python -m jtune.train --config=configs/bert_cls.py --config.train.init_from=/tmp/dapt --workdir=/tmp/cls

The second run starts from the first run's encoder (its best checkpoint's weights; a fresh classifier head), the
one switch being `train.init_from`. `/tmp/dapt/export` is a BertForMaskedLM folder that `transformers` loads.

Variants: wwm (whole-word masking), tiny (what the tests run), files (JSON Lines with a `text` field),
hub (bert-base-uncased, which brings its pretrained MLM head), and a mesh preset (dp, fsdp, fsdp_tp).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants, preset = common.split_variants(arg)
  c = common.base_config(preset)
  c.task.name = 'mlm'
  c.data.label_column = ''  # unlabelled text
  c.train.num_epochs = 1
  c.train.eval_at_start = True  # the held-out MLM loss before adaptation
  c.train.best_metric = 'eval_loss'
  c.train.best_mode = 'min'
  c.optim.learning_rate = 5e-5
  common.apply_variants(c, variants, 'bert_mlm.py', {
      'wwm': _whole_words, 'tiny': common.apply_tiny_encoder, 'files': common.use_files, 'hub': _hub})
  return c


def _whole_words(c: ml_collections.ConfigDict) -> None:
  c.task.whole_word_masking = True


def _hub(c: ml_collections.ConfigDict) -> None:
  c.model.name_or_path = 'bert-base-uncased'
