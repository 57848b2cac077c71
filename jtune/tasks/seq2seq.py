"""Sequence to sequence (summarization, headline generation, translation) on an encoder-decoder (T5).

Each row gives a source, `task.prompt_template` over its columns (e.g. 'summarize: {text}'), and a target,
`task.response_template` (e.g. '{title}'). Both are tokenized without the tokenizer's own specials and end with
EOS (the model's `eos_id`: T5's </s>, or [SEP] for a WordPiece vocabulary); sources are cut to data.max_length
tokens and targets to the longest of data.target_buckets. The decoder reads the target shifted right behind the
start token (the pad token, as T5 does) and is trained by teacher forcing: cross-entropy of every target token.

Evaluation reports the loss and perplexity of the targets over the whole split, and, for the first
`task.generate_examples` sources, ROUGE-1/2/L F-measures (`rouge-score`, Porter stemming, the ROUGE-1.5.5
reimplementation) and corpus BLEU (`sacrebleu`, its default 13a tokenization) of decoded outputs (greedy, or beam
search with task.num_beams) against the reference texts.
"""

from __future__ import annotations

from typing import Any, Callable

import datasets
import numpy as np
import sacrebleu

from jtune import config as config_lib
from jtune.data import pipeline
from jtune.data.features import Features, lengths_of, ragged
from jtune.hf import io as hf_io
from jtune.tasks import causal_lm

HEAD = 'seq2seq'
PROBLEM_TYPE = None
ROUGE_TYPES = ('rouge1', 'rouge2', 'rougeL')


# Columns from the two templates, no label set, outputs over the model's own vocabulary: as causal_lm.
check, label_names, num_outputs = causal_lm.check, causal_lm.label_names, causal_lm.num_outputs


def encode(texts: list[str], tokenizer: Any, max_tokens: int | None = None) -> list[list[int]]:
  """Token ids of each text, cut to max_tokens - 1 (None: whole), then EOS."""
  eos = hf_io.eos_id(tokenizer)
  if eos is None:
    raise ValueError(f'tokenizer {type(tokenizer).__name__} has no EOS or SEP token: expected one to end sequences')
  ids = tokenizer(texts, add_special_tokens=False)['input_ids'] if texts else []
  return [row[:None if max_tokens is None else max_tokens - 1] + [eos] for row in ids]


def featurize(ds: datasets.Dataset, split: str, cfg: config_lib.DataConfig, task: config_lib.TaskConfig,
              tokenizer: Any, labels: list[str], *, training: bool) -> Features:
  del split, labels, training
  rows = ds.to_list()
  sources = encode([task.prompt_template.format(**row) for row in rows], tokenizer, cfg.max_length)
  references = [task.response_template.format(**row) for row in rows]
  targets = encode(references, tokenizer, cfg.target_buckets[-1])
  start = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  decoder_inputs = [[start] + target[:-1] for target in targets]
  target_tokens = {'decoder_input_ids': ragged(decoder_inputs), 'targets': ragged(targets)}
  input_ids = ragged(sources)
  return Features(tokens={'input_ids': input_ids}, rows={}, lengths=lengths_of(input_ids),
                  host={'references': references}, target_tokens=target_tokens,
                  target_lengths=lengths_of(target_tokens['targets']))


loss_sums = causal_lm.loss_sums
eval_outputs = causal_lm.eval_outputs
summarize = causal_lm.summarize


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
  """Mean ROUGE-1/2/L F-measures and corpus BLEU, all in percent."""
  # rouge-score imports nltk and scipy.stats (2 s): only where a seq2seq run evaluates, not in every jtune start.
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
  scores = [scorer.score(reference, prediction) for prediction, reference in zip(predictions, references)]
  out = {name: 100.0 * float(np.mean([s[name].fmeasure for s in scores])) for name in ROUGE_TYPES}
  out['bleu'] = float(sacrebleu.corpus_bleu(predictions, [references]).score)
  return out


def generation_metrics(generate: Callable[[list[list[int]]], list[list[int]]], features: Features,
                       tokenizer: Any, limit: int) -> dict[str, float]:
  """Decodes the first `limit` sources and scores the texts against their references."""
  sources = [list(ids) for ids in features.input_ids[:limit]]
  references = features.host['references'][:limit]
  outputs = generate(sources)
  predictions = [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in outputs]
  return text_metrics(predictions, references)
