"""Text-to-image Self-Flow with a FLUX.2-style MMDiT (double- then single-stream blocks).

Variants (`--config=configs/t2i.py:<variant>[,method=<method>]`):
  local    CPU-sized, on embedded Fashion-MNIST with generated captions (several phrasings per
           class) through a trainable byte-level text encoder; minutes on 2 cores.
           python -m self_flow.main --config=configs/t2i.py:local --workdir=workdirs/t2i_local
  default  The paper's ~625M model (hidden 1152, 16 heads, 7 double + 14 single blocks, 3-D RoPE
           24+24+24) on SD-VAE latents (32x32x4, patch 2 = 256 tokens) and precomputed caption
           embeddings, read from latent shards written by `self_flow.tools.write_latent_shards`:
           python -m self_flow.main --config=configs/t2i.py --workdir=gs://BUCKET/t2i \\
             --config.data.data_dir=gs://BUCKET/shards
Methods: self_flow (default), vanilla, dual_timestep, diffusion_forcing, full_masking.
"""

from configs import base


def get_config(arg: str | None = None):
  args = base.parse_arg(arg, variant="default", method="self_flow")
  config = base.get_base_config()
  base.apply_method(config, args["method"])
  config.model.architecture = "mmdit"
  config.model.conditioning = "text"
  config.sampling.num_steps = 50  # Paper A.4: 50 Euler ODE steps on a shift-warped grid.
  config.sampling.method = "euler"
  if args["variant"] == "default":
    config.model.preset = "custom"
    config.model.hidden_size = 1152
    config.model.num_heads = 16
    config.model.depth = 21
    config.model.num_double = 7
    config.model.rope_axes_dims = (24, 24, 24)
    config.model.patch_size = 2
    config.model.remat_policy = "dots"
    config.text.encoder = "precomputed"
    config.text.embedding_dim = 4096  # e.g. T5-XXL; must match the shards' metadata.
    config.text.max_length = 128
    config.data.dataset = "latent_shards"
    config.data.data_dir = ""  # Set on the command line: the latent-shard directory.
    config.data.image_size = 32  # SD-VAE latents of 256x256 images.
    config.data.num_channels = 4
    config.data.global_batch_size = 256
    config.data.worker_count = 4
    config.train.num_steps = 1_000_000
    config.train.eval_every = 0
    config.sampling.shift = 1.78  # Paper A.4: sampleshift 1.78 for SD-VAE latents.
  elif args["variant"] == "local":
    config.model.preset = "custom"
    config.model.hidden_size = 128
    config.model.num_heads = 4
    config.model.depth = 5
    config.model.num_double = 1
    config.model.mlp_ratio = 2.0  # Keeps a step near 0.5 s on 2 cores (ratio 4, depth 6: 0.77 s).
    config.model.rope_axes_dims = (4, 14, 14)
    config.model.patch_size = 4
    config.model.compute_dtype = "float32"  # bf16 matmuls are no faster on XLA:CPU.
    config.text.encoder = "bytes"
    config.text.max_length = 48  # the longest generated caption has 44 bytes
    config.text.width = 64
    config.text.depth = 1
    config.text.num_heads = 4
    config.data.global_batch_size = 64
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 100
    config.optim.ema_decay = 0.995  # Short run: see configs/c2i.py.
    config.train.num_steps = 1_200
    config.train.log_every = 100
    config.train.checkpoint_every = 400
    config.train.eval_every = 0
    config.eval.classifier_steps = 1000
    config.eval.grid_rows = 3
    config.eval.prompts = (  # Held-out phrasings (never seen in training), one per class.
        "a picture showing a tee", "product shot: a pair of jeans", "here is a sweater",
        "a picture showing a dress", "product shot: a jacket", "here is a sandal",
        "a picture showing a blouse", "product shot: a sneaker", "here is a handbag",
        "a picture showing an ankle boot")
  else:
    raise ValueError(f"variant {args['variant']!r} is unknown; allowed: default, local.")
  return config
