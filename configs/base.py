"""Pieces shared by the run configs: the config-argument parser and recipes of settings.

The keys themselves, their defaults and the methods live in `self_flow/base_config.py` (the
library reads them); the run configs here start from it.
"""

import ml_collections


def parse_arg(arg: str | None, **defaults) -> dict[str, str]:
  """'local,method=vanilla' -> {'variant': 'local', 'method': 'vanilla'} (big_vision style)."""
  parsed = dict(defaults)
  for part in filter(None, (arg or "").split(",")):
    if "=" in part:
      key, value = part.split("=", 1)
      if key not in defaults:
        raise ValueError(f"config arg {key!r} (in {arg!r}) is unknown; "
                         f"allowed: {sorted(defaults)}.")
      parsed[key] = value
    else:
      parsed["variant"] = part
  return parsed


def use_pod_layout(config: ml_collections.ConfigDict) -> None:
  """How every paper-scale preset lays out on a TPU slice (chosen from ahead-of-time compiles,
  benchmarks/TPU_AOT.md): parameters, EMA and Adam state split over every chip of the slice
  (ZeRO-3 / FSDP: mesh data=1, fsdp=-1) instead of replicated, and the fastest attention kernel
  of the platform (splash on TPU, cuDNN on GPU, XLA on CPU). Multi-slice runs put the slices
  on data: --config.mesh.data=<slices>. Each FSDP-split weight is gathered whole before its
  matmul (no collective matmul): the step-time band of the compiled step
  (benchmarks/TPU_AOT.md) drops by a third to a half on t2i, t2v, c2i_imagenet256 and
  multimodal, whose per-shard partial products otherwise re-read and re-write every matmul's
  output once per chip of the slice."""
  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.mesh.tensor = 1
  config.mesh.rules = "fsdp_tp"
  config.mesh.collective_matmul = False
  config.model.attention = "auto"


def use_paper_mmdit(config: ml_collections.ConfigDict) -> None:
  """The paper's ~625M FLUX.2-style model (hidden 1152, 16 heads, 7 double + 14 single blocks,
  3-D RoPE 24+24+24) with precomputed caption embeddings: every text-conditioned default."""
  use_pod_layout(config)
  config.model.architecture = "mmdit"
  config.model.conditioning = "text"
  config.model.preset = "custom"
  config.model.hidden_size = 1152
  config.model.num_heads = 16
  config.model.depth = 21
  config.model.num_double = 7
  config.model.rope_axes_dims = (24, 24, 24)
  config.model.remat_policy = "dots"
  config.text.encoder = "precomputed"
  config.text.embedding_dim = 4096  # e.g. T5-XXL; must match the shards' metadata.
  config.text.max_length = 128
  config.data.worker_count = 4
  config.train.num_steps = 1_000_000
  config.train.eval_every = 0
  config.sampling.num_steps = 50  # Paper A.4: 50 Euler ODE steps on a shift-warped grid.
  config.sampling.method = "euler"


def use_short_run_emas(config: ml_collections.ConfigDict, *, teacher_ema_decay: float) -> None:
  """EMAs for runs of a few thousand steps (every `local` variant; not the paper presets).

  With one fixed-decay EMA as both teacher and evaluated model, a short run's teacher lags far
  behind the student (c2i local, 300 steps, decay 0.995: held-out flow loss 0.75 for the EMA vs
  0.33 for the student), so the student is distilled toward a worse model. Warm-up keeps each
  EMA's window at about n / 9 steps until it reaches its decay, and the teacher gets a shorter
  horizon than the evaluated weights, so that it is a smoothed copy of the current student.
  """
  config.optim.ema_warmup = True
  config.optim.teacher_ema_decay = teacher_ema_decay


def use_local_mmdit(config: ml_collections.ConfigDict, *, num_steps: int) -> None:
  """The CPU-sized MMDiT with a trainable byte-level text encoder that every text-conditioned
  `local` variant shares (about 0.5 s per 64-example image step on 2 cores)."""
  config.model.architecture = "mmdit"
  config.model.conditioning = "text"
  config.model.preset = "custom"
  config.model.hidden_size = 128
  config.model.num_heads = 4
  config.model.depth = 5
  config.model.num_double = 1
  config.model.mlp_ratio = 2.0  # Keeps a step near 0.5 s on 2 cores (ratio 4, depth 6: 0.77 s).
  config.model.rope_axes_dims = (4, 14, 14)
  config.model.compute_dtype = "float32"  # bf16 matmuls are no faster on XLA:CPU.
  config.text.encoder = "bytes"
  config.text.max_length = 48  # the longest generated image caption has 44 bytes
  config.text.width = 64
  config.text.depth = 1
  config.text.num_heads = 4
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 100
  config.optim.ema_decay = 0.995  # Short run: see configs/c2i.py.
  use_short_run_emas(config, teacher_ema_decay=0.98)
  config.train.num_steps = num_steps
  config.train.log_every = 100
  config.train.checkpoint_every = 400
  config.train.eval_every = 0
  config.eval.classifier_steps = 1000
  config.eval.grid_rows = 3
  config.sampling.num_steps = 50
  config.sampling.method = "euler"
