"""What every jtune config file shares: the logical-axis rules table and the mesh presets.

Imports nothing from jtune. A config file applies a preset with `apply_mesh_preset`, usually from a variant
(`configs/bert_cls.py:fsdp` or `configs/bert_cls.py:tiny,fsdp_tp`).
"""

import ml_collections

# Logical axis -> mesh axes, for parameters and for activations (Flax lm1b style). The models name logical axes
# only; this one table places them on the (data, fsdp, tensor) mesh:
#   - a batch is split over data x fsdp (FSDP is data parallelism whose parameters are split too);
#   - parameters are split over fsdp along their `embed` axis, and gathered just in time by XLA;
#   - tensor parallelism is Megatron's: attention heads and the MLP's hidden units are split over `tensor`, so
#     query/key/value and the MLP's first matmul are column-parallel and the two output matmuls row-parallel:
#     one reduction per attention block and one per MLP block in the forward pass;
#   - `vocab` stays whole: Hugging Face vocabularies (30522, 50257, ...) rarely divide by a mesh axis, and the
#     embedding table is already split over fsdp along `embed`.
# An axis of size 1 splits nothing, so this table serves every mesh shape.
RULES = (
    ('batch', ('data', 'fsdp')),
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
