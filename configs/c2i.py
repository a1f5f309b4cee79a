"""Class-conditional image generation with Self-Flow (and its baselines) on Fashion-MNIST.

Variants (`--config=configs/c2i.py:<variant>[,method=<method>]`):
  local    CPU-sized: trains to recognisable samples on 2 CPU cores in minutes.
           python -m self_flow.main --config=configs/c2i.py:local --workdir=workdirs/c2i_local
  default  SiT-B/2 on 28x28 Fashion-MNIST for an accelerator (196 tokens per image).
           python -m self_flow.main --config=configs/c2i.py --workdir=gs://BUCKET/c2i
  cpu_reference  The step-time reference protocol of the performance issue, replayed exactly:
           SiT-S/2 on 4x32x32 latents (256 tokens), batch 8, fp32, ImageNet's 1000 classes;
           timed by `python -m self_flow.bench` (see benchmarks/RESULTS.md), or trained on
           latent shards with --config.data.data_dir=DIR.
Methods: self_flow (default), vanilla, dual_timestep, diffusion_forcing, full_masking.
"""

from configs import base
from self_flow import base_config


def get_config(arg: str | None = None):
  args = base.parse_arg(arg, variant="default", method="self_flow")
  config = base_config.get_base_config()
  base_config.apply_method(config, args["method"])
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
    base.use_short_run_emas(config, teacher_ema_decay=0.98)  # warm-up; a 50-step teacher
    config.train.num_steps = 1_500
    config.train.log_every = 100
    config.train.checkpoint_every = 500
    config.train.eval_every = 0
    config.eval.num_samples = 1000
    config.eval.classifier_steps = 1000
  elif args["variant"] == "cpu_reference":
    config.model.preset = "S"  # SiT-S: hidden 384, depth 12, 6 heads.
    config.model.patch_size = 2
    # 0 = the 0.3/0.7 rule: layers 4/8 of 12 as in the reference (XL overrides get 8/20).
    config.model.student_layer = 0
    config.model.teacher_layer = 0
    config.model.compute_dtype = "float32"
    config.model.param_dtype = "float32"
    config.model.remat_policy = "none"
    config.data.dataset = "latent_shards"  # SD-VAE latents; the benchmark feeds synthetic ones.
    config.data.data_dir = ""  # Set to train on real latents; the benchmark needs none.
    config.data.image_size = 32  # 4x32x32 latents, patch 2 -> 256 tokens.
    config.data.num_channels = 4
    config.data.num_classes = 1000  # + the null class (label drop below).
    config.data.global_batch_size = 8
    # gamma 0.8 and dual-timestep noising come from method=self_flow (the default method).
    config.objective.condition_dropout = 0.1
    config.objective.mask_ratio = 0.25
    config.objective.time_distribution = "uniform"
    config.optim.learning_rate = 1e-4  # AdamW, constant, no warm-up, no weight decay.
    config.optim.warmup_steps = 0
    config.optim.weight_decay = 0.0
    config.optim.grad_clip_norm = 1.0
    config.optim.ema_decay = 0.9999
    config.mesh.data = -1  # Every device: one on the reference CPU run.
  else:
    raise ValueError(f"variant {args['variant']!r} is unknown; allowed: default, local, "
                     "cpu_reference.")
  return config
