"""Class-conditional image generation with Self-Flow (and its baselines) on Fashion-MNIST.

Variants (`--config=configs/c2i.py:<variant>[,method=<method>]`):
  local    CPU-sized: trains to recognisable samples on 2 CPU cores in minutes.
           python -m self_flow.main --config=configs/c2i.py:local --workdir=workdirs/c2i_local
  default  SiT-B/2 on 28x28 Fashion-MNIST for an accelerator (196 tokens per image).
           python -m self_flow.main --config=configs/c2i.py --workdir=gs://BUCKET/c2i
Methods: self_flow (default), vanilla, dual_timestep, diffusion_forcing, full_masking.
"""

from configs import base


def get_config(arg: str | None = None):
  args = base.parse_arg(arg, variant="default", method="self_flow")
  config = base.get_base_config()
  base.apply_method(config, args["method"])
  if args["variant"] == "default":
    config.model.preset = "B"
    config.model.patch_size = 2
    config.data.global_batch_size = 256
    config.data.worker_count = 4
    config.train.num_steps = 200_000
    config.train.eval_every = 20_000
  elif args["variant"] == "local":
    config.model.preset = "custom"
    config.model.hidden_size = 128
    config.model.depth = 6
    config.model.num_heads = 4
    config.model.patch_size = 4
    config.model.compute_dtype = "float32"  # bf16 matmuls are no faster on XLA:CPU.
    config.data.global_batch_size = 64
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 100
    # Short run: 0.999 left 22% of the random init in the EMA after 1500 steps (EMA loss 0.67 vs
    # 0.28 for the student); 0.995 averages ~200 steps, keeping the teacher a lagged student.
    config.optim.ema_decay = 0.995
    config.train.num_steps = 1_500
    config.train.log_every = 100
    config.train.checkpoint_every = 500
    config.train.eval_every = 0
    config.eval.num_samples = 1000
    config.eval.classifier_steps = 1000
  else:
    raise ValueError(f"variant {args['variant']!r} is unknown; allowed: default, local.")
  return config
