"""Class-conditional ImageNet 256x256: the paper's main setup (Sec. 4, Tab. 1) on SD-VAE latents.

SiT-XL/2 with per-token adaLN on 32x32x4 SD-VAE latents (256 tokens), trained "with the REPA
setup": AdamW lr 1e-4 constant, no weight decay, clip 1.0, global batch 256, EMA 0.9999, label
dropout 0.1, uniform p(t), R_M 0.25, gamma 0.8, student/teacher layers round(0.3 depth) /
round(0.7 depth) (8/20 for XL), bfloat16 compute.

Data: the trainer reads pre-encoded latents from a latent-shard directory; it never runs the VAE.
ImageNet pixels (TFDS imagenet2012 or an image folder) go through the encode tool first, which
stores the scaled (x 0.18215) posterior mean and std of every center-cropped image:

  python -m self_flow.tools.encode_latents --vae_path=/data/sd-vae-ft-ema --source=tfds \
      --tfds_data_dir=/data/tensorflow_datasets --split=train --output_dir=/data/imagenet256_sdvae
  python -m self_flow.main --config=configs/c2i_imagenet256.py \
      --config.data.data_dir=/data/imagenet256_sdvae --workdir=gs://BUCKET/c2i_imagenet256
Pod: sized for a 16-chip v5p slice (v5p:2x2x4): FSDP over the chips (mesh data=1, fsdp=-1; 16
images per chip), weights gathered whole before each matmul (`mesh.collective_matmul=False`),
splash attention, no remat; compiled ahead of time there (benchmarks/TPU_AOT.md; on v5e:4x4 the
step also fits, with 15% of HBM free):
  python -m self_flow.aot --config=configs/c2i_imagenet256.py --topology=v5p:2x2x4
Its step-time band (a model of the compiled program, not a measurement): 47-86 ms per step,
2970-5450 images/s, MFU 36-66%, bound by HBM bandwidth (47 ms of memory traffic against 31 ms of
compute). With collective matmuls it was 80-118 ms (26-39%). SiT-XL's 675M parameters at 16
images of 256 tokens per chip leave v5p's compute units waiting on memory; already without remat,
the lower end stays under 40%. On v5e:4x4 and v6e:4x4 collective matmuls are the better choice
(--config.mesh.collective_matmul=True: v5e 86-197 ms, 37-84%, against 106-230 ms, 32-68%; v6e
44-71 ms, 22-35%, against 56-84 ms, 18-28%).

Variants (`--config=configs/c2i_imagenet256.py:<variant>[,method=<method>]`): XL (default), L, B,
S: the SiT-*/2 sizes, feature layers by the 0.3/0.7 rule (XL 8/20, L 7/17, B and S 4/8).
Methods: self_flow (default), vanilla, dual_timestep, diffusion_forcing, full_masking.

Evaluation: the trainer evaluates only embedded datasets (it has no decoder for latents), so it
is off here. The paper's numbers come from 50k samples of the EMA model with the 250-step SDE
sampler set below, no CFG, decoded by the SD-VAE, scored by the ADM evaluator (separate tool).
"""

from configs import base
from self_flow import base_config

VARIANTS = ("XL", "L", "B", "S")


def get_config(arg: str | None = None):
  args = base.parse_arg(arg, variant="XL", method="self_flow")
  if args["variant"] not in VARIANTS:
    raise ValueError(f"variant {args['variant']!r} is unknown; allowed: {', '.join(VARIANTS)}.")
  config = base_config.get_base_config()
  base_config.apply_method(config, args["method"])  # self_flow: dual-timestep noising, gamma 0.8.
  config.model.preset = args["variant"]  # SiT-S/B/L/XL: hidden, depth and heads of the preset.
  config.model.patch_size = 2  # 32x32 latents -> 256 tokens of 2x2x4.
  config.model.student_layer = 0  # 0 = round(0.3 depth): 8 for XL.
  config.model.teacher_layer = 0  # 0 = round(0.7 depth): 20 for XL.
  config.model.compute_dtype = "bfloat16"  # bf16 mixed precision, float32 master weights.
  base.use_pod_layout(config)  # FSDP over the slice, splash/cuDNN attention.
  config.data.dataset = "latent_shards"  # Pre-encoded SD-VAE latents (tools/encode_latents).
  config.data.data_dir = ""  # Required: the latent-shard directory (--config.data.data_dir=...).
  config.data.image_size = 32  # 256x256 images / the VAE's factor 8.
  config.data.num_channels = 4  # SD-VAE latent channels (already x 0.18215 in the shards).
  config.data.num_classes = 1000  # ImageNet-1k; label 1000 is the null class for CFG.
  config.data.global_batch_size = 256  # REPA/SiT global batch.
  config.data.worker_count = 4  # Shard reading and posterior draws off the training thread.
  # REPA samples the stored posterior moments each epoch; "mean" trains on the mean only.
  config.data.latent_sampling = "posterior"
  config.objective.time_distribution = "uniform"  # Paper A.2: uniform, unshifted p(t).
  config.objective.mask_ratio = 0.25  # R_M for images.
  config.objective.condition_dropout = 0.1  # REPA's cfg-prob.
  config.optim.learning_rate = 1e-4  # AdamW (0.9, 0.999), eps 1e-8: REPA defaults.
  config.optim.schedule = "constant"  # No decay.
  config.optim.warmup_steps = 0  # None in the paper or REPA.
  config.optim.weight_decay = 0.0  # REPA: no weight decay.
  config.optim.grad_clip_norm = 1.0  # Global-norm clip (paper README).
  config.optim.ema_decay = 0.9999  # The EMA teacher and evaluation weights.
  config.train.num_steps = 4_000_000  # Tab. 1 is at 4M steps.
  config.train.checkpoint_every = 10_000  # 400 saves over 4M steps; SIGTERM saves in between.
  config.train.eval_every = 0  # No in-trainer evaluation on latents (see the docstring).
  config.eval.enabled = False  # The trainer has no decoder for latent shards.
  # The sampler of the paper's ImageNet numbers (SiT SDE, 250 steps, no guidance), used by the
  # sample-export and evaluation tools.
  config.sampling.method = "sde"
  config.sampling.num_steps = 250
  config.sampling.cfg_scale = 1.0
  return config
