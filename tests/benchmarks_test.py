"""The analytic model FLOPs that MFU is computed from, against counts worked out by hand; the profile's op events,
read from a real trace, and their grouping by HLO instruction; the A/B processes' start order and the memory check
before each; the benchmark models' attention dropout override; the throughput table's memory cell."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import hlo_profile, workloads


def test_bert_base_flops_by_hand():
  # per layer: query, key, value, output 4 x 768^2 and MLP 2 x 768 x 3072 weights, 2 FLOPs each per token;
  # attention scores and weighted sum 2 x 2 x 128 x 768 per token; the last layer's keys and values at every
  # token, the rest of it (query, output, MLP, one row of scores) on the first; pooler + classifier on it too.
  dense = 4 * 768 * 768 + 2 * 768 * 3072
  last = 128 * 2 * (2 * 768 * 768) + 2 * (dense - 2 * 768 * 768) + 4 * 128 * 768
  per_row = 128 * 11 * (2 * dense + 4 * 128 * 768) + last + 2 * (768 * 768 + 768 * 2)
  assert workloads.model_flops(workloads.SHAPES['bert-base'], 16, 128, train=False) == pytest.approx(16 * per_row)
  assert workloads.model_flops(workloads.SHAPES['bert-base'], 16, 128, train=True) == pytest.approx(48 * per_row)


def test_llama_flops_count_grouped_query_attention_swiglu_and_the_lm_head():
  # SmolLM2-135M: 9 query heads and 3 key/value heads of 64; SwiGLU has three 576 x 1536 matrices.
  attention = 2 * 576 * 576 + 2 * 576 * 192
  per_token = 30 * (2 * (attention + 3 * 576 * 1536) + 4 * 512 * 576) + 2 * 576 * 49152
  assert workloads.model_flops(workloads.SHAPES['llama-135m'], 2, 512, train=True) == pytest.approx(
      3 * 2 * 512 * per_token)


_HLO = """
ENTRY %main.1 (p: f32[16,128,768]) -> f32[] {
  %ynn_fusion.12 = f32[2048,3072]{1,0} fusion(%a), calls=%f, metadata={op_name="jit(train_step)/bert/layer_3/mlp/dot"}
  %ynn_fusion.13 = f32[2048,3072]{1,0} fusion(%c, %d), calls=%fc.2, metadata={op_name="bert/layer_11/mlp/dot"}
  %custom-call.4 = (bf16[2048,768]{1,0}, s8[4194304]{0}) custom-call(%g, %h), custom_call_target="__cublas$gemm", metadata={op_name="jit(train_step)/bert/layer_0/attention/output/dot_general"}
  %dynamic-update-slice.2 = f32[4,8]{1,0} dynamic-update-slice(%i, %j, %k, %l)
  ROOT %copy.7 = f32[768]{0} copy(%e)
}
"""


def test_profile_groups_events_by_kind_shape_and_layer_folded_op():
  ops = hlo_profile.hlo_ops(_HLO)
  assert ops['ynn_fusion.12'] == ('f32[2048,3072]', 'bert/layer_N/mlp/dot')
  assert ops['copy.7'] == ('f32[768]', '')
  assert ops['custom-call.4'] == ('(bf16[2048,768], s8[4194304])', 'bert/layer_N/attention/output/dot_general')
  assert ops['dynamic-update-slice.2'] == ('f32[4,8]', '')
  events = [('ynn_fusion.12', 30), ('ynn_fusion.13', 12), ('end: ynn_fusion.12', 0), ('copy.7', 5),
            ('ThunkExecutor::Execute', 100), ('fusion.99', 1)]
  totals = hlo_profile.group_events(events, ops)
  assert totals == {('ynn_fusion', 'f32[2048,3072]', 'bert/layer_N/mlp/dot'): 42,
                    ('copy', 'f32[768]', ''): 5, ('fusion', '?', '?'): 1}


def test_processes_of_variants_start_in_mirrored_order():
  assert workloads.mirrored(['', '-O2'], 1) == ['', '-O2']
  assert workloads.mirrored(['', '-O2'], 2) == ['', '-O2', '-O2', '']
  order = workloads.mirrored(['a', 'b', 'c'], 4)
  assert order == ['a', 'b', 'c', 'c', 'b', 'a', 'a', 'b', 'c', 'c', 'b', 'a']
  # every variant's mean start position is the same, so a drift with start order favours none
  assert len({sum(i for i, v in enumerate(order) if v == name) for name in 'abc'}) == 1


def test_processes_start_only_where_memory_holds_the_rest_as_large_as_the_largest_so_far():
  gib = 2**30
  workloads.room_for_the_rest([], 0, 0, 4)  # the first: nothing measured yet
  workloads.room_for_the_rest([3 * gib, 4 * gib], 9 * gib, 2, 4)  # two more of 4.4 GiB
  with pytest.raises(SystemExit, match=r'^processes 3-4 would need about 8\.8 GiB \(2 x 4\.4 GiB, the largest so '
                                       r'far\) with 8\.5 GiB available: expected fewer --copies or variants, or '
                                       r'--nokeep_host_memory$'):
    workloads.room_for_the_rest([3 * gib, 4 * gib], int(8.5 * gib), 2, 4)
  assert workloads.available_bytes() > 0
  assert workloads.peak_rss_bytes() > 2**20  # this Python process, in bytes (not KiB)


def test_op_events_of_a_cpu_trace_join_the_programs_hlo_instructions(tmp_path):
  x = jnp.ones((256, 256))
  step = jax.jit(lambda v: jnp.sin(v) @ v).lower(x).compile()
  jax.block_until_ready(step(x))
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(3):
      jax.block_until_ready(step(x))
  profile = jax.profiler.ProfileData.from_file(str(next(tmp_path.rglob('*.xplane.pb'))))
  events = hlo_profile.op_events(profile, module='jit__lambda')
  totals = hlo_profile.group_events(events, hlo_profile.hlo_ops(step.as_text()))
  assert events and sum(totals.values()) > 0
  assert all(shape != '?' for _, shape, _ in totals)  # every event is an instruction of this program
  assert not hlo_profile.op_events(profile, module='train_step')  # events name their program


@pytest.mark.parametrize('model, default', [('bert-base', 0.1), ('gpt2', 0.1), ('llama-135m', 0.0)])
def test_attention_dropout_is_the_shapes_unless_given(model, default):
  shape = workloads.SHAPES[model]
  assert workloads.jtune_model(shape, jnp.float32)[0].cfg.attention_dropout == default
  cfg = workloads.jtune_model(shape, jnp.float32, attention_dropout=0.25)[0].cfg
  assert cfg.attention_dropout == 0.25
  assert cfg.hidden_dropout == default  # the other dropouts stay the shape's


def test_dtype_auto_is_float32_on_a_cpu_and_bfloat16_elsewhere():
  assert workloads.resolve_dtype('auto', 'cpu') == 'float32'
  assert workloads.resolve_dtype('auto', 'gpu') == workloads.resolve_dtype('auto', 'tpu') == 'bfloat16'
  assert workloads.resolve_dtype('float32', 'gpu') == 'float32'
  assert workloads.resolve_dtype('bfloat16', 'cpu') == 'bfloat16'


def test_memory_cell_is_the_device_peak_else_the_rss_with_xla_analysis_for_jtune():
  xla = {'argument_mib': 400.0, 'temp_mib': 2900.0, 'output_mib': 400.0, 'alias_mib': 399.6}
  assert workloads.memory_cell({'peak_rss_mib': 6278.2, **xla}, 'cpu') == '6,278 (3,300)'
  assert workloads.memory_cell({'peak_rss_mib': 4646.0}, 'cpu') == '4,646'
  assert workloads.memory_cell({'peak_rss_mib': 9000.0, 'device_peak_mib': 13574.4, **xla}, 'gpu') == '13,574 (3,300)'
  assert workloads.memory_cell({'peak_rss_mib': 3000.0}, 'tpu') == '3,000 RSS'  # PyTorch on the host
