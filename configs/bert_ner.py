"""Fine-tune an encoder for token classification (NER): a tag per word, entity-level (CoNLL) F1.

  python -m jtune.train --config=configs/bert_ner.py --workdir=DIR           # CoNLL-2003 English (hub)
  python -m jtune.train --config=configs/bert_ner.py:files --workdir=DIR \\
      --config.data.data_files.train=train.jsonl --config.data.data_files.validation=dev.jsonl

Data: `tokens` (a list of words) and `ner_tags` (one IOB tag per word: names or ClassLabel ids). Each word's
first sub-token learns its tag; the others are ignored. Variants: files, tiny (what the tests run), lora, frozen,
adafactor, and a mesh preset. For RoBERTa-style BPE tokenizers load them with add_prefix_space.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants, preset = common.split_variants(arg)
  c = common.base_config(preset)
  c.task.name = 'token_classification'
  c.data.dataset = 'eriktks/conll2003'
  c.data.text_column = 'tokens'
  c.data.label_column = 'ner_tags'
  c.train.best_metric = 'eval_f1'
  c.optim.learning_rate = 5e-5
  common.apply_variants(c, variants, 'bert_ner.py', {'files': common.use_files, 'tiny': common.tiny_on_files})
  return c
