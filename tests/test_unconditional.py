"""Unconditional image generation (model.conditioning="none"): no label reaches the model, and a
c2i run trains, samples and evaluates (FD, probe, held-out loss) without one."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_run_config
from self_flow import (conditioning, config_resolution, config_validation, optim, sharding,
                       train, train_state, train_step)


def test_the_model_embeds_no_class_and_ignores_the_labels(make_config):
  config = make_config()
  config.model.conditioning = "none"
  assert conditioning.model_classes(config) == 0
  resolved = config_validation.validate(config)
  mesh = sharding.create_mesh(config.mesh)
  tx, _ = optim.make_optimizer(config.optim, config.train.num_steps)
  layout = train_state.state_layout(config, mesh, tx, sharding.axis_rules(config.mesh), resolved)
  state = train_state.create_train_state(config, layout, tx, resolved)
  assert state["params"]["label_embed"]["embedding"].shape[0] == 1  # the null row only
  loss_fn = jax.jit(train_step.make_loss_fn(config, layout.graphdef,
                                            config_resolution.resolve(config).first_spec))
  b = config.data.global_batch_size
  images = jax.random.uniform(jax.random.PRNGKey(0), (b, 28, 28, 1)) * 2 - 1
  losses = [float(loss_fn(state["params"], state["ema_params"],
                          {"image": images, "label": labels}, jax.random.PRNGKey(1))[0])
            for labels in (jnp.zeros(b, jnp.int32), jnp.arange(b, dtype=jnp.int32) % 10)]
  assert losses[0] == losses[1]
  # The control: the class-conditional model's loss does depend on the labels.
  config = make_config("self_flow")
  layout = train_state.state_layout(config, mesh, tx, sharding.axis_rules(config.mesh))
  state = train_state.create_train_state(config, layout, tx)
  state = dict(state, params=jax.tree.map(lambda p: p + 0.05, state["params"]))
  loss_fn = jax.jit(train_step.make_loss_fn(config, layout.graphdef,
                                            config_resolution.resolve(config).first_spec))
  conditional = [float(loss_fn(state["params"], state["params"],
                               {"image": images, "label": labels}, jax.random.PRNGKey(1))[0])
                 for labels in (jnp.zeros(b, jnp.int32), jnp.arange(b, dtype=jnp.int32) % 10)]
  assert conditional[0] != conditional[1]


def test_unconditional_c2i_trains_samples_and_evaluates(fashion_mnist_dir, tmp_path):
  config = tiny_run_config(fashion_mnist_dir, tmp_path, num_steps=3)
  config.model.conditioning = "none"
  config.eval.probe_examples = 48
  config.eval.probe_timesteps = (0.0, 0.5)
  config.eval.loss_bins = 2
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  metrics = result["eval"]
  assert all(np.isfinite(v) for v in result["losses"].values())
  assert metrics["eval/image/fd"] > 0 and np.isfinite(metrics["eval/image/loss"])
  assert 0 <= metrics["eval/image/probe_t0.5_layer1"] <= 1
  assert -1 <= metrics["eval/image/reference_cosine_t0.5"] <= 1
  # Unconditional samples were asked for no class: no class accuracy is claimed.
  assert not any("class_accuracy" in name for name in metrics)
  assert "step_00000003_unconditional.png" in os.listdir(tmp_path / "run" / "samples")


def test_unconditional_needs_the_dit_backbone():
  from configs import t2i  # pylint: disable=g-import-not-at-top
  config = t2i.get_config("local")
  config.model.conditioning = "none"
  with pytest.raises(ValueError, match="mmdit needs conditioning='text'"):
    config_validation.validate(config)
