"""BERT, RoBERTa and DistilBERT with every head against Hugging Face PyTorch on small random models.

transformers makes and saves each model; jtune loads its backbone, compares hidden states, exports itself with
a random head and checks that `AutoModelFor...` loads the export with no missing keys and predicts the same.
"""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest
import safetensors.numpy

from jtune.hf import bert as hf_bert
from jtune.hf import distilbert as hf_distilbert
from jtune.hf import roberta as hf_roberta
from jtune.models import bert

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

HF = {'bert': hf_bert, 'roberta': hf_roberta, 'distilbert': hf_distilbert}
AUTO = {'sequence': 'AutoModelForSequenceClassification', 'token': 'AutoModelForTokenClassification',
        'qa': 'AutoModelForQuestionAnswering'}
NUM_LABELS = {'sequence': 3, 'token': 5, 'qa': 2}
LENGTHS = (10, 7, 4)  # a padded batch
MAX_LENGTH = max(LENGTHS)
PAD = {'bert': 0, 'roberta': 1, 'distilbert': 0}
DROPOUTS = dict(hidden_dropout=0.1, attention_dropout=0.1, classifier_dropout=0.1)


def hf_config(family: str, num_labels: int = 2):
  small = dict(vocab_size=100, num_labels=num_labels)
  if family == 'distilbert':
    return transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                         max_position_embeddings=16, **small)
  common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **small)
  if family == 'roberta':  # positions run from pad_token_id + 1 to pad_token_id + MAX_LENGTH
    return transformers.RobertaConfig(max_position_embeddings=2 + MAX_LENGTH, type_vocab_size=1, pad_token_id=1,
                                      bos_token_id=0, eos_token_id=2, **common)
  return transformers.BertConfig(max_position_embeddings=16, type_vocab_size=2, **common)


def save_random(auto_class: str, config, folder, seed: int = 0):
  """A random transformers model, every tensor perturbed (no zero biases, no unit LayerNorms), saved."""
  torch.manual_seed(seed)
  model = getattr(transformers, auto_class).from_config(config)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.1)
  model.save_pretrained(folder)
  return model.eval()


def batch(family: str) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  mask = (np.arange(MAX_LENGTH)[None] < np.array(LENGTHS)[:, None]).astype(np.int32)
  ids = np.where(mask > 0, rng.integers(3, 100, mask.shape), PAD[family]).astype(np.int32)
  out = {'input_ids': ids, 'attention_mask': mask}
  if family == 'bert':
    out['token_type_ids'] = (rng.integers(0, 2, mask.shape) * mask).astype(np.int32)
  elif family == 'roberta':
    out['token_type_ids'] = np.zeros_like(ids)
  return out


def torch_inputs(b: dict[str, np.ndarray]) -> dict:
  return {k: torch.from_numpy(v.astype(np.int64)) for k, v in b.items()}


def jtune_config(family: str, head: str, folder) -> bert.BertConfig:
  return HF[family].model_config_from_hf(
      transformers.AutoConfig.from_pretrained(folder), head=head, num_labels=NUM_LABELS[head], **DROPOUTS,
      dtype=np.float32, param_dtype=np.float32)


def init_params(cfg: bert.BertConfig, b: dict[str, np.ndarray]) -> dict:
  inputs = [b[k] for k in HF[cfg.family].INPUTS]
  params = bert.build(cfg).init(jax.random.PRNGKey(0), *inputs, deterministic=True)['params']
  return jax.tree_util.tree_map(np.asarray, nn.unbox(params))


def outputs(hf_model, b: dict[str, np.ndarray], head: str) -> np.ndarray:
  with torch.no_grad():
    out = hf_model(**torch_inputs(b))
  if head == 'qa':
    return np.stack([out.start_logits.numpy(), out.end_logits.numpy()], axis=-1)
  return out.logits.numpy()


def max_diff(a, b, mask=None) -> float:
  diff = np.abs(np.asarray(a) - np.asarray(b))
  return float(np.max(diff if mask is None else diff * mask))


@pytest.mark.parametrize('head', ['sequence', 'token', 'qa'])
@pytest.mark.parametrize('family', ['bert', 'roberta', 'distilbert'])
def test_parity_and_export(tmp_path, family, head):
  source = save_random(AUTO[head], hf_config(family, NUM_LABELS[head]), tmp_path / 'source')
  cfg = jtune_config(family, head, tmp_path / 'source')
  assert (cfg.family, cfg.head) == (family, head)
  b = batch(family)
  real_BL1 = b['attention_mask'][..., None]
  inputs = [b[k] for k in HF[family].INPUTS]

  # The backbone from the checkpoint: the tree jtune builds, and the same hidden states as transformers.
  loaded = HF[family].hf_to_params(safetensors.numpy.load_file(tmp_path / 'source' / 'model.safetensors'), cfg)
  params = init_params(cfg, b)
  assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure({family: params[family]})
  assert ('pooler' in params[family]) == (family == 'bert' and head == 'sequence')
  hidden, _ = bert.BertModel(cfg).apply({'params': loaded[family]}, *inputs, deterministic=True)
  with torch.no_grad():
    want = source.base_model(**torch_inputs(b)).last_hidden_state.numpy()
  assert max_diff(hidden, want, real_BL1) <= 1e-4
  assert max_diff(hidden, want, real_BL1) < max_diff(hidden, want[::-1], real_BL1)  # the check can fail

  # A random head beside the loaded backbone, exported: transformers loads every key and predicts the same.
  rng = np.random.default_rng(1)
  params = {k: v if k == family else jax.tree_util.tree_map(lambda x: rng.normal(0, 0.3, x.shape), v)
            for k, v in params.items()}
  params[family] = loaded[family]
  ours = np.asarray(bert.build(cfg).apply({'params': params}, *inputs, deterministic=True))
  assert ours.shape == ((3, NUM_LABELS[head]) if head == 'sequence' else (3, MAX_LENGTH, NUM_LABELS[head]))
  labels = {i: f'tag{i}' for i in range(NUM_LABELS[head])}
  out = tmp_path / 'export'
  hf_cfg = HF[family].hf_config_for_export(source.config, cfg, labels, None)
  hf_cfg.save_pretrained(out)
  safetensors.numpy.save_file(HF[family].params_to_hf(params, cfg), out / 'model.safetensors',
                              metadata={'format': 'pt'})
  model, info = getattr(transformers, AUTO[head]).from_pretrained(out, output_loading_info=True)
  assert type(model).__name__ == type(source).__name__
  assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys'], info
  theirs = outputs(model.eval(), b, head)
  real = 1 if head == 'sequence' else real_BL1
  assert max_diff(ours, theirs, real) <= 1e-4
  assert max_diff(ours, outputs(source, b, head), real) > 1e-2  # a different head predicts differently
  if head != 'qa':
    assert model.config.id2label == labels and model.config.label2id['tag1'] == 1
  back = HF[family].hf_to_params(safetensors.numpy.load_file(out / 'model.safetensors'), cfg)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, {family: params[family]})


@pytest.mark.parametrize('family', ['bert', 'roberta', 'distilbert'])
def test_base_and_pretraining_checkpoints_load(tmp_path, family):
  """Saved from the base model (no prefix) or with the pretraining head (prefix, MLM head ignored)."""
  config = hf_config(family)
  for auto_class in ('AutoModel', 'AutoModelForMaskedLM'):
    model = save_random(auto_class, config, tmp_path / auto_class)
    tensors = safetensors.numpy.load_file(tmp_path / auto_class / 'model.safetensors')
    prefixed = any(k.startswith(f'{family}.') for k in tensors)
    assert prefixed == (auto_class == 'AutoModelForMaskedLM')
    cfg = jtune_config(family, 'sequence', tmp_path / auto_class)
    params = HF[family].hf_to_params(tensors, cfg)[family]
    word = model.base_model.embeddings.word_embeddings.weight.detach().numpy()
    np.testing.assert_array_equal(params['embeddings']['word_embeddings']['embedding'], word)
    # BertModel has a pooler and BertForMaskedLM none: a sequence head loads it when there, else starts fresh.
    assert ('pooler' in params) == (family == 'bert' and auto_class == 'AutoModel')


def test_roberta_positions_count_from_the_padding_id():
  ids = np.array([[0, 5, 6, 2, 1, 1], [0, 7, 2, 1, 1, 1]])
  cfg = jtune_config_like('roberta')
  want = transformers.models.roberta.modeling_roberta.RobertaEmbeddings.create_position_ids_from_input_ids(
      torch.from_numpy(ids), 1).numpy()
  np.testing.assert_array_equal(bert.position_ids(ids, cfg), want)
  np.testing.assert_array_equal(want[0], [2, 3, 4, 5, 1, 1])
  assert cfg.max_length == MAX_LENGTH


def jtune_config_like(family: str, **overrides) -> bert.BertConfig:
  return HF[family].model_config_from_hf(hf_config(family), **{
      'head': 'sequence', 'num_labels': 2, **DROPOUTS, 'dtype': np.float32, 'param_dtype': np.float32,
      **overrides})


@pytest.mark.parametrize('family,head', [('roberta', 'sequence'), ('distilbert', 'sequence'), ('bert', 'qa')])
def test_lora_exports_as_a_peft_adapter(tmp_path, family, head):
  peft = pytest.importorskip('peft')
  config = hf_config(family, NUM_LABELS[head])
  save_random(AUTO[head], config, tmp_path / 'base')
  cfg = jtune_config(family, head, tmp_path / 'base')
  cfg = bert.BertConfig(**{**cfg.__dict__, 'lora_rank': 4, 'lora_alpha': 8.0})
  b = batch(family)
  inputs = [b[k] for k in HF[family].INPUTS]
  rng = np.random.default_rng(2)
  params = jax.tree_util.tree_map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32), init_params(cfg, b))
  loaded = HF[family].hf_to_params(safetensors.numpy.load_file(tmp_path / 'base' / 'model.safetensors'), cfg)
  for path, leaf in jax.tree_util.tree_flatten_with_path(loaded)[0]:  # the base weights; random adapters
    node = params
    for key in path[:-1]:
      node = node[key.key]
    node[path[-1].key] = leaf
  ours = np.asarray(bert.build(cfg).apply({'params': params}, *inputs, deterministic=True))
  state, modules, to_save = HF[family].peft_adapter(params, cfg)
  assert len(modules) == 2 * cfg.num_layers and all(m.endswith(('query', 'value', 'q_lin', 'v_lin'))
                                                    for m in modules)
  assert to_save == {'sequence': {'roberta': ['classifier'], 'distilbert': ['pre_classifier', 'classifier']},
                     'qa': {'bert': ['qa_outputs']}}[head][family]
  adapter = tmp_path / 'adapter'
  adapter.mkdir()
  (adapter / 'adapter_config.json').write_text(json.dumps({
      'peft_type': 'LORA', 'task_type': {'sequence': 'SEQ_CLS', 'qa': 'QUESTION_ANS'}[head], 'r': 4,
      'lora_alpha': 8.0, 'lora_dropout': 0.0, 'bias': 'none', 'fan_in_fan_out': False, 'inference_mode': True,
      'target_modules': '^(' + '|'.join(m.replace('.', r'\.') for m in modules) + ')$',
      'modules_to_save': to_save}))
  safetensors.numpy.save_file(state, adapter / 'adapter_model.safetensors', metadata={'format': 'pt'})
  base = getattr(transformers, AUTO[head]).from_pretrained(tmp_path / 'base')
  with_adapter = peft.PeftModel.from_pretrained(base, adapter).eval()
  real = 1 if head == 'sequence' else b['attention_mask'][..., None]
  # The wrapped transformers model: PeftModelForQuestionAnswering.forward drops token_type_ids.
  assert max_diff(ours, outputs(with_adapter.get_base_model(), b, head), real) <= 1e-4
  with with_adapter.disable_adapter():
    assert max_diff(ours, outputs(with_adapter.get_base_model(), b, head), real) > 1e-2  # the adapter matters


def test_export_config_labels_and_problem_types():
  for num_labels, problem_type, want in [(1, None, 'regression'), (3, None, 'single_label_classification'),
                                         (3, 'multi_label_classification', 'multi_label_classification')]:
    cfg = jtune_config_like('roberta', num_labels=num_labels)
    exported = hf_roberta.hf_config_for_export(hf_config('roberta'), cfg, {}, problem_type)
    assert exported.problem_type == want and exported.num_labels == num_labels
    assert exported.architectures == ['RobertaForSequenceClassification'] and exported.dtype == 'float32'
  qa = jtune_config_like('distilbert', head='qa', num_labels=0)
  assert qa.num_labels == 2
  exported = hf_distilbert.hf_config_for_export(hf_config('distilbert'), qa, {}, None)
  assert exported.num_labels == 2 and exported.architectures == ['DistilBertForQuestionAnswering']
  assert exported.problem_type is None and isinstance(exported, transformers.DistilBertConfig)
  token = jtune_config_like('bert', head='token', num_labels=3)
  with pytest.raises(ValueError, match=r'^id2label has 2 labels: expected num_labels=3 of the model$'):
    hf_bert.hf_config_for_export(hf_config('bert'), token, {0: 'O', 1: 'B'}, None)
  with pytest.raises(ValueError, match=r"^problem_type='regression': expected None for the 'token' head$"):
    hf_bert.hf_config_for_export(hf_config('bert'), token, {0: 'O', 1: 'B', 2: 'I'}, 'regression')
  with pytest.raises(ValueError, match=r"^problem_type='ranking': expected one of single_label_classification"):
    hf_bert.hf_config_for_export(hf_config('bert'), jtune_config_like('bert'), {}, 'ranking')


@pytest.mark.parametrize('family,field,value,message', [
    ('distilbert', 'sinusoidal_pos_embds', True, 'sinusoidal_pos_embds=True in config.json: expected False'),
    ('distilbert', 'activation', 'relu', "activation='relu' in config.json: expected gelu"),
    ('roberta', 'hidden_act', 'gelu_new', "hidden_act='gelu_new' in config.json: expected gelu"),
    ('roberta', 'pad_token_id', None, 'pad_token_id=None in config.json: expected the padding id'),
    ('roberta', 'max_position_embeddings', 2, 'max_position_embeddings=2 in config.json: expected more than'),
    ('bert', 'is_decoder', True, 'is_decoder=True in config.json: expected False'),
])
def test_unsupported_configs_are_rejected(family, field, value, message):
  bad = hf_config(family)
  setattr(bad, field, value)
  with pytest.raises(ValueError, match=f'^{message}'):
    HF[family].model_config_from_hf(
        bad, head='sequence', num_labels=2, **DROPOUTS, dtype=np.float32, param_dtype=np.float32)


def test_bad_heads_and_families_are_rejected():
  with pytest.raises(ValueError, match=r"^model_type='bert' in config.json: expected a RoBERTa checkpoint"):
    hf_roberta.model_config_from_hf(hf_config('bert'), head='sequence', num_labels=2, **DROPOUTS,
                                    dtype=np.float32, param_dtype=np.float32)
  with pytest.raises(ValueError, match=r"^head='causal_lm': expected one of sequence, token, qa, mlm for a "):
    jtune_config_like('distilbert', head='causal_lm')
  with pytest.raises(ValueError, match=r"^head='mlm': the masked-LM head is built for BERT checkpoints, not "):
    jtune_config_like('roberta', head='mlm')
  with pytest.raises(ValueError, match=r"^num_labels=0: expected at least 1 for the 'token' head$"):
    jtune_config_like('bert', head='token', num_labels=0)
  with pytest.raises(ValueError, match=r'^type_vocab_size=2: expected 0 for DistilBERT'):
    bert.BertConfig(**{**jtune_config_like('distilbert').__dict__, 'type_vocab_size': 2})


@pytest.mark.parametrize('family', ['roberta', 'distilbert'])
def test_missing_and_unexpected_keys_are_listed(tmp_path, family):
  save_random('AutoModel', hf_config(family), tmp_path)
  tensors = safetensors.numpy.load_file(tmp_path / 'model.safetensors')
  cfg = jtune_config_like(family)
  key = {'roberta': 'encoder.layer.1.attention.self.key.bias',
         'distilbert': 'transformer.layer.1.attention.k_lin.bias'}[family]
  name = {'roberta': 'RoBERTa', 'distilbert': 'DistilBERT'}[family]
  with pytest.raises(ValueError, match=rf'^checkpoint is missing 1 {name} keys: {key}$'):
    HF[family].hf_to_params({k: v for k, v in tensors.items() if k != key}, cfg)
  extra = key.replace('.1.', '.2.')
  with pytest.raises(ValueError, match=rf'^checkpoint has 1 unexpected keys for a 2-layer {name}: {extra}$'):
    HF[family].hf_to_params({**tensors, extra: np.zeros(3)}, cfg)
