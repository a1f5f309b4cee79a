"""Joint multi-modal Self-Flow: one transformer for images, video and audio (paper Sec. 4.2).

Every step trains one modality, drawn with `mixture.probabilities` (paper: image 0.57, video
0.30, audio 0.13) and weighted by `mixture.loss_weights`; the model has per-modality input and
output projections and shares everything else. Per-modality losses and evaluations are logged
as `train/<modality>/...` and `eval/<modality>/...`.

Variants (`--config=configs/multimodal.py:<variant>[,method=<method>]`):
  local    CPU-sized, on the three embedded datasets (captioned Fashion-MNIST, moving-sprite
           clips, spoken words); minutes on 2 cores.
           python -m self_flow.main --config=configs/multimodal.py:local \\
             --workdir=workdirs/multimodal_local
  default  The paper's ~625M MMDiT on image, video and audio latent shards, FSDP over a 16-chip
           v5p slice (v5p:2x2x4; the image batch 608 needs data x fsdp to divide it: 16 or 32):
           python -m self_flow.main --config=configs/multimodal.py --workdir=gs://BUCKET/mm \\
             --config.data.data_dir=gs://BUCKET/image_shards \\
             --config.video.data_dir=gs://BUCKET/video_shards \\
             --config.audio.data_dir=gs://BUCKET/audio_shards
  4b       The paper's 4B scale (Sec. 4.3) on the same data: FSDP 32 x tensor 2 on v5p:4x4x4
           (64 chips), no remat (see `use_4b_backbone`):
           python -m self_flow.main --config=configs/multimodal.py:4b --workdir=gs://BUCKET/mm4b \\
             --config.data.data_dir=... --config.video.data_dir=... --config.audio.data_dir=...
  Compile either for its slice first, without a TPU (benchmarks/TPU_AOT.md):
           python -m self_flow.aot --config=configs/multimodal.py --topology=v5p:2x2x4
           python -m self_flow.aot --config=configs/multimodal.py:4b --topology=v5p:4x4x4
  Step-time bands (models of the compiled programs, not measurements), weights gathered whole
  before each matmul (`mesh.collective_matmul=False`), remat "dots":
    default on v5p:2x2x4, HBM-bound: image 140-261 ms (MFU 43-79%), video 266-526 ms (48-94%),
      audio 65-120 ms (38-71%: 16 clips of 378 tokens per chip leave it memory-bound). With
      collective matmuls: 25-33% / 29-41% / 23-32%.
    4b on v5p:4x4x4 (fsdp 32 x tensor 2, remat "none"): image 196-528 ms (MFU 35-95%), video
      372-942 ms (40-100%), audio 84-239 ms (32-92%); memory, compute and the tensor-parallel
      activations' collectives are close in each. The earlier fsdp 16 x tensor 4, remat "full"
      with collective matmuls gave 25-69% / 28-78% / 20-44%; only video reaches 40% at the lower
      end (with tensor 1 the image batch 608 does not divide over 64 chips).
Methods: self_flow (default), vanilla, dual_timestep, diffusion_forcing, full_masking.
"""

from configs import base
from self_flow import base_config


def get_config(arg: str | None = None):
  args = base.parse_arg(arg, variant="default", method="self_flow")
  config = base_config.get_base_config()
  base_config.apply_method(config, args["method"])
  config.modalities = ("image", "video", "audio")
  config.objective.time_distribution = "logit_normal"
  if args["variant"] in ("default", "4b"):
    base.use_paper_mmdit(config)
    config.model.patch_size = 2
    config.data.dataset = config.video.dataset = config.audio.dataset = "latent_shards"
    config.data.data_dir = config.video.data_dir = config.audio.data_dir = ""  # From the CLI.
    config.data.image_size = 32  # FLUX.2-AE latents (32 channels) of 512x512 images.
    config.data.num_channels = 32
    config.objective.train_shift = 4.63  # Paper A.2: image part of the mixed model.
    config.sampling.shift = 6.93  # Paper A.4.
    config.video.num_frames, config.video.image_size, config.video.num_channels = 12, 16, 48
    config.video.patch_time = config.video.patch_size = 1
    config.audio.num_frames, config.audio.num_channels = 250, 64
    config.audio.frames_per_token = 1
    # Paper App. D: 38 / 8 / 16 per batch (chosen so step times match), here x16.
    config.data.global_batch_size = 608
    config.video.global_batch_size = 128
    config.audio.global_batch_size = 256
    if args["variant"] == "4b":
      use_4b_backbone(config)
  elif args["variant"] == "local":
    base.use_local_mmdit(config, num_steps=300)
    # 300 steps: an EMA horizon of 50 steps keeps 0.2% of the initialisation in the sampled
    # (and teacher) weights; 0.995 kept 22% and sampled pure noise.
    config.optim.ema_decay = 0.98
    config.optim.teacher_ema_decay = 0.95  # as in configs/t2a.py:local
    config.model.patch_size = 4
    config.model.rope_axes_dims = (8, 12, 12)
    config.text.max_length = 64  # the longest caption of the three datasets (motion captions)
    config.data.global_batch_size = 64
    config.video.global_batch_size = 32
    config.audio.global_batch_size = 64
    config.video.sample_shift = 2.95  # As in configs/t2v.py:local.
    config.audio.sample_shift = 1.0  # As in configs/t2a.py:local.
    config.eval.num_samples = 256
    config.eval.batch_size = 128
  else:
    raise ValueError(f"variant {args['variant']!r} is unknown; allowed: default, 4b, local.")
  return config


def use_4b_backbone(config) -> None:
  """The paper's scaled multi-modal model (Sec. 4.3): a 4B FLUX.2-style backbone, here with
  FLUX.2 [klein] 4B's published sizes (hidden 3072 = 24 heads x 128, 5 double + 20 single
  blocks, SwiGLU ratio 3, caption embeddings of width 7680), 3.95B parameters with our
  per-modality projections. Laid out as FSDP over 32 x tensor parallelism over 2 on a 64-chip
  v5p slice, every activation kept for the backward (remat "none"; 55 GiB of 95 on the video
  step): the best step-time band of the layouts compiled (benchmarks/TPU_AOT.md); fsdp 16 x
  tensor 4 with remat "full" moved 87% more collective bytes (tensor-parallel activations) and
  recomputed the forward."""
  m = config.model
  m.hidden_size, m.num_heads, m.depth, m.num_double = 3072, 24, 25, 5
  m.mlp_ratio = 3.0  # SwiGLU hidden 9216.
  m.rope_axes_dims = (32, 48, 48)  # 128 = the head dim.
  m.remat_policy = "none"
  config.text.embedding_dim = 7680  # e.g. three stacked hidden states of a 4B LLM encoder.
  config.mesh.fsdp = 32  # fsdp x data must divide every modality's batch (608 = 32 x 19)
  config.mesh.tensor = 2
  config.mesh.data = -1
