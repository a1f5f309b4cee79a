"""The PyTorch reference Self-Flow step of the benchmark (self_flow/torch_reference).

torch is an optional benchmark-only dependency that CI does not install, so the tests that run
torch skip without it; the FLOP accounting, the config checks and the missing-torch error, which
decide what the benchmark claims, are checked everywhere.
"""

import importlib.util
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import c2i
from self_flow import bench, config_resolution, flops, optim, torch_reference, train_step
from self_flow.models import factory
from conftest import tiny
from equivalence import assert_equivalent, assert_fault_detected, rounding_bound

needs_torch = pytest.mark.skipif(
    not torch_reference.available(),
    reason="torch is not installed (optional `bench` extra: pip install -e '.[bench]'); the "
           "PyTorch step is not run, its FLOP count and config checks still are.")


def tiny_config(batch: int = 2):
  """cpu_reference with the tiny model at depth 3 (layers 1/2, so the teacher stops before the
  end), 16 tokens of 16 channels (the preset's patch 2 on 8x8x4)."""
  return tiny(c2i.get_config("cpu_reference"), {
      "model.depth": 3, "model.patch_size": 2, "data.image_size": 8, "data.num_classes": 10,
      "data.global_batch_size": batch,
      "objective.condition_dropout": 0.5,  # some labels become the null class
  })


def test_setting_reads_the_cpu_reference_protocol():
  s = torch_reference.setting(c2i.get_config("cpu_reference"))
  assert (s.shape.width, s.shape.depth, s.num_heads, s.shape.tokens, s.grid) == (
      384, 12, 6, 256, (16, 16))
  assert (s.shape.student_layer, s.shape.teacher_layer, s.batch, s.num_classes) == (4, 8, 8, 1000)
  assert (s.learning_rate, s.grad_clip_norm, s.ema_decay, s.weight_decay) == (1e-4, 1.0, 0.9999,
                                                                               0.0)
  assert (s.gamma, s.mask_ratio, s.condition_dropout) == (0.8, 0.25, 0.1)


@pytest.mark.parametrize("key, value, match", [
    ("objective.time_distribution", "logit_normal", "time_distribution='logit_normal'"),
    ("optim.teacher_ema_decay", 0.99, "teacher_ema_decay=0.99"),
    ("objective.rep_loss_weight", 0.0, "rep_loss_weight=0.0"),
    ("model.compute_dtype", "bfloat16", "compute_dtype='bfloat16'"),
])
def test_setting_rejects_a_step_it_does_not_implement(key, value, match):
  config = c2i.get_config("cpu_reference")
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=match):
    torch_reference.setting(config)


def test_equal_math_counts_our_flops_and_public_the_per_token_extra():
  """equal = flops.py's count of our JAX step; public - equal = the per-token rows and the
  teacher's remaining blocks and final layer, counted here by hand."""
  config = c2i.get_config("cpu_reference")
  s = torch_reference.setting(config)
  equal, public = (torch_reference.step_flops(s, m) for m in ("equal", "public"))
  assert equal == flops.train_step_flops(config, config_resolution.resolve(config))
  n, d, c, mlp = 256, 384, 16, 1536
  depth, teacher_layer = 12, 8
  cond_row = 2 * (256 * d + d * d)  # timestep MLP per row
  block_row = 2 * d * 6 * d  # adaLN modulation per row
  block = n * (block_row + 2 * d * 3 * d + 2 * d * d + 4 * d * mlp) + 4 * n * n * d
  student = (n - 2) * (cond_row + depth * block_row + 2 * d * 2 * d)
  teacher = ((n - 1) * (cond_row + teacher_layer * block_row) + (depth - teacher_layer) * block
             + n * (2 * d * 2 * d + 2 * d * c))
  assert public.total - equal.total == 8 * (3 * student + teacher)
  assert round(equal.total / 1e9, 1) == 362.9 and round(public.total / 1e9, 1) == 576.8


def test_missing_torch_and_unknown_variants_are_named(monkeypatch):
  s = torch_reference.setting(tiny_config())
  with pytest.raises(ValueError, match="math='private'"):
    torch_reference.make_step(s, "private", np.zeros((2, 8, 8, 4)), np.zeros(2))
  with pytest.raises(ValueError, match="torch_equal"):
    bench.run(tiny_config(), ["torch_fast"], warmup=1, repeats=1)
  monkeypatch.setattr(torch_reference, "available", lambda: False)
  with pytest.raises(ModuleNotFoundError, match=r"pip install -e \"\.\[bench\]\""):
    torch_reference.make_step(s, "equal", np.zeros((2, 8, 8, 4)), np.zeros(2))
  with pytest.raises(ModuleNotFoundError, match="needs torch"):  # before compiling ours
    bench.run(tiny_config(), ["self_flow", "torch_equal"], warmup=1, repeats=1)


def test_torch_with_triton_after_tensorflow_is_refused(monkeypatch):
  """torch's CUDA build imports triton, which crashed the process after TensorFlow: a clear error
  instead, and none where triton is absent or TensorFlow not loaded."""
  find_spec = importlib.util.find_spec
  triton = {"present": True}
  monkeypatch.setattr(torch_reference, "available", lambda: True)
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: (
      (object() if triton["present"] else None) if name == "triton" else find_spec(name, *args)))
  monkeypatch.setitem(sys.modules, "tensorflow", types.ModuleType("tensorflow"))
  with pytest.raises(RuntimeError, match="(?s)triton.*segmentation fault.*whl/cpu"):
    torch_reference.require()
  triton["present"] = False
  torch_reference.require()
  triton["present"] = True
  monkeypatch.delitem(sys.modules, "tensorflow")
  torch_reference.require()


def to_torch(params) -> dict:
  """Our parameter tree -> the torch model's state dict: kernels transposed to (out, in), the
  stacked blocks numbered."""
  import torch  # pylint: disable=g-import-not-at-top
  state = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys, array = [p.key for p in path], np.asarray(leaf)
    per_block = ([(["blocks", str(i), *keys[1:]], a) for i, a in enumerate(array)]
                 if keys[0] == "blocks" else [(keys, array)])
    for names, a in per_block:
      last = {"kernel": "weight", "embedding": "weight"}.get(names[-1], names[-1])
      a = a.T if names[-1] == "kernel" else a
      state[".".join([*names[:-1], last])] = torch.from_numpy(np.array(a))
  return state


def jax_params(config, seed: int):
  """(graphdef, params) of our model with every parameter N(0, 0.1^2), the zero-initialised
  adaLN included, so that every path of the step carries signal. Drawn on the abstract model:
  building it eagerly takes longer than the rest of the test."""
  graphdef, abstract = nnx.split(
      nnx.eval_shape(lambda: factory.create_model(config, nnx.Rngs(0))), nnx.Param)
  leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(abstract))
  rng = np.random.default_rng(seed)
  return graphdef, jax.tree.unflatten(treedef, [
      jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype) for a in leaves])


def reference_steps(config, state: dict | None = None):
  """Both torch maths on the same batch, student and teacher loaded with the same weights:
  `state`, else N(0, 0.1^2) for every parameter."""
  import torch  # pylint: disable=g-import-not-at-top
  batch = bench.synthetic_batch(config, config_resolution.resolve(config).first_spec)
  s = torch_reference.setting(config)
  steps = {m: torch_reference.make_step(s, m, batch["latent"], batch["label"], threads=1)
           for m in torch_reference.MATHS}
  if state is None:
    generator = torch.Generator().manual_seed(0)
    state = {name: 0.1 * torch.randn(value.shape, generator=generator)
             for name, value in steps["equal"].student.state_dict().items()}
  for step in steps.values():
    step.student.load_state_dict(state)
    step.teacher.load_state_dict(state)
  return steps


def close(a, b, atol):
  np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-5, atol=atol)


@needs_torch
def test_public_and_equal_maths_give_the_same_losses_and_update():
  """Per-token adaLN = the distinct-row gather, the full teacher read at its layer = the
  truncated teacher, so one step moves the weights the same way."""
  from self_flow.torch_reference import step as step_lib  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  steps = reference_steps(config)
  draw = steps["equal"].draw()
  out = {m: step_lib.losses(st.student, st.teacher, st.setting, m, draw) for m, st in steps.items()}
  for field in ("loss_gen", "loss_rep"):
    close(getattr(out["public"], field), getattr(out["equal"], field), atol=1e-6)
  # The teacher features: the full teacher read at its layer against the truncated one, equal
  # up to rounding (bound 960 float32 roundings, as the tiny model's forward in test_model).
  teachers = [getattr(out[m], "teacher").detach().numpy() for m in ("public", "equal")]
  assert_equivalent(*teachers, bound=rounding_bound(960))
  assert_fault_detected(np.roll(teachers[0], 1, axis=1), teachers[1], bound=rounding_bound(960),
                        fault="teacher features one token off")
  for st in steps.values():
    st.update(draw)
  public, equal = (dict(steps[m].student.named_parameters()) for m in ("public", "equal"))
  for name, value in equal.items():
    close(public[name], value, atol=1e-5)


@needs_torch
def test_equal_math_is_our_jax_step():
  """Same weights and the JAX step's own draws: over two steps (the second one is where the
  clipping scale reaches AdamW's update) the torch step's losses, weights and EMA match ours
  (train_step.make_train_step)."""
  import torch  # pylint: disable=g-import-not-at-top
  from self_flow.torch_reference import step as step_lib  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  graphdef, params = jax_params(config, seed=1)
  tx, schedule = optim.make_optimizer(config.optim, config.train.num_steps)
  state = {"step": jnp.zeros((), jnp.int32), "nonfinite_steps": jnp.zeros((), jnp.int32),
           "params": params, "ema_params": params, "opt_state": tx.init(params)}
  spec = config_resolution.resolve(config).spec("image")
  batch, rng = bench.synthetic_batch(config, spec), jax.random.PRNGKey(0)
  jax_step = jax.jit(train_step.make_train_step(config, graphdef, tx, schedule, spec))
  # The draw the JAX step makes from its rng, handed to the torch step.
  draw_fn = jax.jit(train_step._make_draw_fn(config, spec))  # pylint: disable=protected-access
  as_torch = lambda a: torch.from_numpy(np.array(a))
  reference = reference_steps(config, to_torch(params))["equal"]
  dropped = False
  for step in range(2):
    state, metrics = jax_step(state, batch, rng)
    ex = draw_fn(batch, jax.random.fold_in(rng, step))
    draw = step_lib.Draw(as_torch(ex.x0), as_torch(ex.x1), as_torch(ex.cond).long(),
                         as_torch(ex.draw.t[:, 0]), as_torch(ex.draw.s[:, 0]),
                         as_torch(ex.draw.mask))
    dropped |= draw.labels.tolist() != batch["label"].tolist()
    got = reference.update(draw)
    assert float(metrics["grad_norm"]) > config.optim.grad_clip_norm  # clipping is on
    for key in ("loss", "loss_gen", "loss_rep"):
      np.testing.assert_allclose(got[key], float(metrics[key]), rtol=1e-5)
    for model, tree in ((reference.student, state["params"]),
                        (reference.teacher, state["ema_params"])):
      want = to_torch(tree)
      for name, value in model.state_dict().items():
        close(value, want[name], atol=1e-5)
  assert dropped  # the null class is exercised


@needs_torch
@pytest.mark.parametrize("math", torch_reference.MATHS)
def test_torch_counts_the_analytic_flops(math):
  """torch's own FLOP counter over one whole step = step_flops, less the two input gradients
  autograd skips (the patch embedding's and the timestep MLP's first layer: their inputs need
  none). CPU flash attention, which the counter does not know, is counted as flops.py does
  (4 N S D forward, twice that backward)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch.utils import flop_counter  # pylint: disable=g-import-not-at-top
  aten = torch.ops.aten

  def attention(q, k, v, *args, out_shape=None, **kwargs):
    return 4 * q[0] * q[1] * q[2] * k[2] * q[3]

  def attention_backward(grad, q, k, v, *args, out_shape=None, **kwargs):
    return 2 * attention(q, k, v)

  config = tiny_config()
  step = reference_steps(config)[math]
  counter = flop_counter.FlopCounterMode(display=False, custom_mapping={
      aten._scaled_dot_product_flash_attention_for_cpu: attention,  # pylint: disable=protected-access
      aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward})  # pylint: disable=protected-access
  with counter:
    step.step()
  s = step.setting
  rows = 2 if math == "equal" else s.shape.tokens
  skipped = s.batch * (flops.dense(s.shape.tokens, s.shape.token_dim, s.shape.width)
                       + flops.dense(rows, 256, s.shape.width))
  assert counter.get_total_flops() == torch_reference.step_flops(s, math).total - skipped


def test_bench_ratios_put_both_torch_maths_over_ours():
  rows = {"self_flow": {"median": 2.0}, "torch_equal": {"median": 3.0},
          "torch_public": {"median": 5.0}}
  assert bench.ratios(rows) == {label: {"torch_public": 2.5, "torch_equal": 1.5}[a]
                                for label, a, _ in bench.TORCH_RATIOS}


@needs_torch
def test_bench_times_both_torch_maths():
  """The torch rows, FLOPs and the same-loss check of `python -m self_flow.bench` (ours is
  left out here: compiling it for the test's 8 fake devices is the slow part)."""
  config = tiny_config()
  result = bench.run(config, ["torch_equal", "torch_public"], warmup=1, repeats=2,
                     configured_peak=1.0)
  rows, s = result["rows"], torch_reference.setting(config)
  assert list(rows) == ["torch_equal", "torch_public"]
  for name, math in bench.TORCH_VARIANTS.items():
    assert rows[name]["gflop"] == torch_reference.step_flops(s, math).total / 1e9
  assert "PyTorch public vs equal math losses" in result["report"]
  assert f", {bench.torch_threads()} intra-op threads" in result["report"]
