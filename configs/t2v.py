"""Text-to-video Self-Flow: clips as spatio-temporal patch tokens with 3-D positions.

Variants (`--config=configs/t2v.py:<variant>[,method=<method>]`):
  local    CPU-sized, on the embedded moving-sprites clips (8 frames of 32x32: a Fashion-MNIST
           object moving left/right/up/down at one of two speeds) with captions naming the
           object and its motion; minutes on 2 cores.
           python -m self_flow.main --config=configs/t2v.py:local --workdir=workdirs/t2v_local
  default  The paper's ~625M MMDiT on Wan2.2-style video latents (12 latent frames of 16x16x48,
           3072 tokens x 48 dims) and precomputed caption embeddings from latent shards:
           python -m self_flow.main --config=configs/t2v.py --workdir=gs://BUCKET/t2v \\
             --config.video.data_dir=gs://BUCKET/video_shards
           Sized for a 16-chip v5p slice (v5p:2x2x4; 3200-token sequences): FSDP over the
           chips (4 clips per chip), weights gathered whole before each matmul
           (`mesh.collective_matmul=False`), remat "dots", splash attention; compiled ahead of
           time there (benchmarks/TPU_AOT.md):
           python -m self_flow.aot --config=configs/t2v.py --topology=v5p:2x2x4
           Its step-time band (a model of the compiled program, not a measurement): 128-262
           ms per step, 244-501 clips/s, MFU 48-98%, compute and HBM traffic nearly equal (125
           / 128 ms). Collective matmuls gave 297-430 ms (29-42%); remat "none" 143-277 ms.
Methods: self_flow (default), vanilla, dual_timestep, diffusion_forcing, full_masking.
Paper settings kept in both: R_M 0.1, logit-normal p(t) with trainshift 2.95 (paper App. C).
"""

from configs import base
from self_flow import base_config


def get_config(arg: str | None = None):
  args = base.parse_arg(arg, variant="default", method="self_flow")
  config = base_config.get_base_config()
  base_config.apply_method(config, args["method"])
  config.modalities = ("video",)
  config.objective.time_distribution = "logit_normal"
  if args["variant"] == "default":
    base.use_paper_mmdit(config)
    config.video.dataset = "latent_shards"
    config.video.data_dir = ""  # Set on the command line: the latent-shard directory.
    config.video.num_frames = 12  # Wan2.2 AE: 45 frames -> 1 + 44/4 latent frames (paper 2.4).
    config.video.image_size = 16  # 192p / 16x spatial compression (incl. patching), ~square.
    config.video.num_channels = 48
    config.video.patch_time = 1
    config.video.patch_size = 1  # The AE's compression already includes the 2x2 patching.
    config.video.global_batch_size = 64
    config.video.sample_shift = 15.0  # Paper A.4.
  elif args["variant"] == "local":
    base.use_local_mmdit(config, num_steps=600)
    config.model.rope_axes_dims = (8, 12, 12)  # 4 token frames x 4 x 4 patches
    config.text.max_length = 64  # motion captions are at most 64 bytes
    config.video.global_batch_size = 32
    # 0.995 keeps 5% of the initial weights after 600 steps and sampled noisy clips; 0.99
    # keeps 0.2% (as configs/t2a.py does for its 300 steps).
    config.optim.ema_decay = 0.99
    # The paper's sampleshift 15 was tuned for 3k-token latent videos; these 64-token pixel
    # clips sample on the grid they were trained on.
    config.video.sample_shift = 2.95
    config.eval.num_samples = 400
    config.eval.batch_size = 200
  else:
    raise ValueError(f"variant {args['variant']!r} is unknown; allowed: default, local.")
  return config
