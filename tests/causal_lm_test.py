"""Causal-LM fine-tuning end to end on tiny decoders (Llama with SmolLM2's tokenizer, and GPT-2): instruction
data with the loss on the response, packing, perplexity, generation accuracy, export and `jtune.generate`."""

import json
import shutil

import ml_collections
import numpy as np
import pytest

from tests.cli import run_cli
from tests.tasks_e2e_test import run_task

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')


def _check_run(run, metrics, records, export, generation=True):
  want = {'eval_loss', 'eval_perplexity', 'eval_tokens'} | ({'eval_generation_accuracy'} if generation else set())
  assert set(metrics) == want
  assert metrics['eval_perplexity'] == pytest.approx(np.exp(metrics['eval_loss']), rel=1e-6)
  losses = [r['loss'] for r in records if 'loss' in r]
  assert losses[-1] < losses[0], losses
  before = [r for r in records if r['step'] == 0]  # train.eval_at_start: the untuned model, as step 0
  assert len(before) == 1 and before[0]['eval_loss'] > metrics['eval_loss']
  # The export is a ForCausalLM folder that transformers loads and that predicts what jtune predicts.
  model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
  prompt = list(run.eval_split.host['prompt_ids'][0][:48])  # raw text: a whole article; keep the head
  ids = np.asarray([prompt], np.int32)
  batch = {'input_ids': ids, 'positions': np.arange(ids.shape[1])[None], 'segment_ids': np.ones_like(ids),
           'attention_mask': np.ones_like(ids), 'token_type_ids': np.zeros_like(ids)}
  from tests.tasks_e2e_test import jtune_outputs  # pylint: disable=g-import-not-at-top
  ours = jtune_outputs(run, batch)
  with torch.no_grad():
    theirs = model(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  return model, prompt


def test_llama_instruction_tuning(tmp_path, cache_dir):
  run, metrics, records = run_task('causal_lm', 'tiny,fsdp_tp', tmp_path / 'run', cache_dir)
  model, prompt = _check_run(run, metrics, records, tmp_path / 'run' / 'export')
  config = json.loads((tmp_path / 'run' / 'export' / 'config.json').read_text())
  assert config['architectures'] == ['LlamaForCausalLM'] and config['num_key_value_heads'] == 2
  # The generate command answers like transformers' greedy generate on the exported weights.
  text = run.model.tokenizer.decode(prompt)
  out = run_cli('jtune.generate', f'--model={tmp_path / "run" / "export"}', f'--prompt={text}',
                '--max_new_tokens=5', f'--cache_dir={cache_dir}')
  completion = json.loads(out.stdout.strip().splitlines()[-1])['completion']
  with torch.no_grad():
    want = model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False,
                          eos_token_id=run.model.tokenizer.eos_token_id)[0, len(prompt):]
  assert completion == run.model.tokenizer.decode(want, skip_special_tokens=True)
  # --chat: the question through the export's chat template, as transformers' apply_chat_template tokenizes it.
  question = [{'role': 'user', 'content': 'Is this film good?'}]
  chat_ids = run.model.tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)['input_ids']
  with torch.no_grad():
    want = model.generate(torch.tensor([chat_ids]), max_new_tokens=4, do_sample=False,
                          eos_token_id=run.model.tokenizer.eos_token_id)[0, len(chat_ids):]
  out = run_cli('jtune.generate', f'--model={tmp_path / "run" / "export"}', f'--prompt={question[0]["content"]}',
                '--chat', '--max_new_tokens=4', f'--cache_dir={cache_dir}')
  completion = json.loads(out.stdout.strip().splitlines()[-1])['completion']
  assert completion == run.model.tokenizer.decode(want, skip_special_tokens=True)


def test_gpt2_domain_adaptation(tmp_path, cache_dir):
  """A random GPT-2 with SmolLM2's byte-level BPE tokenizer, made by transformers, on raw text (every token a
  target), its tied LM head and loss applied to two slices of the positions in turn (model.lm_head_chunks)."""
  from jtune import modeling  # pylint: disable=g-import-not-at-top
  from configs import causal_lm  # pylint: disable=g-import-not-at-top
  tokenizer = transformers.AutoTokenizer.from_pretrained(modeling.resolve_folder(causal_lm.SMOLLM2, cache_dir))
  config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=len(tokenizer),
                                   bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
  torch.manual_seed(0)
  transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / 'gpt2')
  tokenizer.save_pretrained(tmp_path / 'gpt2')
  run, metrics, records = run_task(
      'causal_lm', 'bbc,tiny,fsdp', tmp_path / 'run', cache_dir, model__name_or_path=str(tmp_path / 'gpt2'),
      model__init='pretrained', model__config_overrides=ml_collections.ConfigDict(), task__generate_examples=0,
      model__lm_head_chunks=2)
  _check_run(run, metrics, records, tmp_path / 'run' / 'export', generation=False)  # raw text: no answers
  # --chat with a tokenizer that has no chat template: one line, not transformers' advice
  plain = tmp_path / 'plain'
  shutil.copytree(tmp_path / 'gpt2', plain, ignore=shutil.ignore_patterns('chat_template*'))
  saved = json.loads((plain / 'tokenizer_config.json').read_text())
  (plain / 'tokenizer_config.json').write_text(json.dumps({k: v for k, v in saved.items() if k != 'chat_template'}))
  proc = run_cli('jtune.generate', f'--model={plain}', '--prompt=hi', '--chat', f'--cache_dir={cache_dir}',
                 check=False)
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
      f"jtune: error: --chat: the tokenizer of '{plain}' has no chat template: expected an instruction-tuned"), (
          proc.stderr[-3000:])
