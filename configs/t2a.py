"""Text-to-audio Self-Flow: log-mel spectrograms as tokens along time.

Variants (`--config=configs/t2a.py:<variant>[,method=<method>]`):
  local    CPU-sized, on the embedded spoken words (ten words synthesised offline by espeak-ng
           in several voices, speeds and pitches; the caption is the exact transcript); minutes
           on 2 cores. Samples are written as WAV files (Griffin-Lim) and spectrogram PNGs.
           python -m self_flow.main --config=configs/t2a.py:local --workdir=workdirs/t2a_local
  default  The paper's ~625M MMDiT on Songbloom-style audio latents (250 frames x 64 channels,
           one token per frame) and precomputed caption embeddings from latent shards:
           python -m self_flow.main --config=configs/t2a.py --workdir=gs://BUCKET/t2a \\
             --config.audio.data_dir=gs://BUCKET/audio_shards
           Sized for a v5e-16 slice (v5e:4x4): FSDP over the 16 chips (8 clips per chip),
           collective matmuls kept (`mesh.collective_matmul=True`, unlike the other presets),
           remat "dots", splash attention; compiled ahead of time there
           (benchmarks/TPU_AOT.md):
           python -m self_flow.aot --config=configs/t2a.py --topology=v5e:4x4
           Its step-time band (a model of the compiled program, not a measurement): 74-154 ms
           per step, 830-1720 clips/s, MFU 35-72%, bound by HBM bandwidth (74 ms of memory
           traffic against 53 ms of compute, 26 ms of collectives). What limits it is the small
           per-chip batch against v5e's memory bandwidth; no layout compiled reached 40% at
           the lower end: whole-weight gathers 66-175 ms (30-81%), remat "none" 101-182 ms,
           v5e:2x4 (16 clips per chip) 236-370 ms (29-45%).
Methods: self_flow (default), vanilla, dual_timestep, diffusion_forcing, full_masking.
Paper settings kept in both: R_M 0.5, logit-normal p(t) with trainshift 1.0 (paper App. B).
"""

from configs import base
from self_flow import base_config


def get_config(arg: str | None = None):
  args = base.parse_arg(arg, variant="default", method="self_flow")
  config = base_config.get_base_config()
  base_config.apply_method(config, args["method"])
  config.modalities = ("audio",)
  config.objective.time_distribution = "logit_normal"
  if args["variant"] == "default":
    base.use_paper_mmdit(config)
    config.audio.dataset = "latent_shards"
    config.audio.data_dir = ""  # Set on the command line: the latent-shard directory.
    config.audio.num_frames = 250  # Songbloom AE: 25 latents/s x 10 s (paper 2.5).
    config.audio.num_channels = 64
    config.audio.frames_per_token = 1
    config.audio.global_batch_size = 128
    config.model.rope_axes_dims = (24, 24, 24)
    # 8 clips of 378 tokens per chip: collective matmuls give the shorter upper bound of the band
    # here (154 against 175 ms, TPU_AOT.md).
    config.mesh.collective_matmul = True
  elif args["variant"] == "local":
    base.use_local_mmdit(config, num_steps=300)
    # 300 steps: an EMA horizon of 50 steps keeps 0.2% of the initialisation in the sampled
    # (and teacher) weights; 0.995 kept 22% and sampled pure noise.
    config.optim.ema_decay = 0.98
    config.optim.teacher_ema_decay = 0.95  # a 20-step teacher: shorter than the sampled EMA
    config.model.rope_axes_dims = (16, 8, 8)  # tokens vary along time only
    config.text.max_length = 16  # transcripts are single words
    config.audio.global_batch_size = 64
    # The paper's sampleshift 6.93 was tuned on 250-token latents; 32-token log-mels sample on
    # the grid they were trained on.
    config.audio.sample_shift = 1.0
    config.eval.num_samples = 256
    config.eval.batch_size = 128
  else:
    raise ValueError(f"variant {args['variant']!r} is unknown; allowed: default, local.")
  return config
