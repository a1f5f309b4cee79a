"""A PyTorch Self-Flow train step, written from the method, for the step-time benchmark.

Why it exists: "faster than PyTorch" means little across sessions and machines, so the benchmark
times a PyTorch step in the same process, interleaved with ours (issue 18). It is a SiT/DiT with
the shapes, initialisation and hyperparameters of a `self_flow` config, fp32, and one train step
end to end: CFG label dropout, dual-timestep noising, student forward + backward on
L_gen + gamma L_rep through the projector, EMA teacher forward under no_grad, global-norm
clipping, AdamW, EMA update of every parameter. Two maths of the same step:

  public  what public PyTorch Self-Flow trainers compute: per-token adaLN (the timestep MLP and
          every modulation Linear run on all B x N tokens, B x N x 6D rows per block) and a full
          teacher forward (all blocks and the final layer), read at the teacher layer.
  equal   our math (self_flow/models): timestep MLP and modulation on the distinct conditions only
          (2 per example for the student, 1 for the teacher), gathered per token; the teacher
          stops at the layer it is read from. The same model FLOPs as our JAX step.

Both give the same losses and updates on the same weights and draws (tests/test_torch_reference
checks it, and that `equal` matches our JAX step). torch is an optional, benchmark-only
dependency (`pip install -e ".[bench]"`): this module imports without it, and the torch code in
`model` and `step` is imported only when a step is built.
"""

import dataclasses
import importlib.util
import sys

import ml_collections
import numpy as np

from self_flow import config_resolution, flops, train_state

MATHS = ("public", "equal")
# The config values this step implements (anything else would time a different step).
SUPPORTED = (
    ("model.architecture", ("dit",)),
    ("model.conditioning", ("class",)),
    ("model.timestep_input", ("t",)),
    ("model.position_embedding_order", ("height_width",)),
    ("model.compute_dtype", ("float32",)),
    ("model.param_dtype", ("float32",)),
    ("objective.noising", ("dual_timestep",)),
    ("objective.time_distribution", ("uniform",)),
    ("optim.schedule", ("constant",)),
    ("optim.warmup_steps", (0,)),
    ("optim.moment_dtype", ("float32",)),
    ("optim.ema_warmup", (False,)),
    ("train.microbatches", (1,)),
)


@dataclasses.dataclass(frozen=True)
class Setting:
  """Everything the PyTorch step needs from a config: sizes and hyperparameters."""

  shape: flops.ModelShape
  num_heads: int
  patch_size: int
  grid: tuple[int, int]  # patches along height and width
  num_classes: int  # + 1 null class (index num_classes)
  batch: int
  mask_ratio: float
  condition_dropout: float
  gamma: float  # weight of L_rep
  loss_weight: float  # the modality's loss multiplier
  learning_rate: float
  betas: tuple[float, float]
  adam_eps: float
  weight_decay: float
  grad_clip_norm: float  # 0 = no clipping
  ema_decay: float
  seed: int


def _value(config: ml_collections.ConfigDict, key: str):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def setting(config: ml_collections.ConfigDict) -> Setting:
  """The `Setting` of a class-conditional image Self-Flow config; raises naming any config value
  this step does not implement."""
  for key, allowed in SUPPORTED:
    if _value(config, key) not in allowed:
      raise ValueError(f"{key}={_value(config, key)!r}: the PyTorch reference step implements "
                       f"{list(allowed)} only.")
  resolved = config_resolution.resolve(config)
  specs = resolved.specs
  if tuple(specs) != ("image",):
    raise ValueError(f"modalities={tuple(specs)}: the PyTorch reference step is image-only.")
  spec, obj, optim, m = specs["image"], config.objective, config.optim, config.model
  if obj.rep_loss_weight <= 0:
    raise ValueError(f"objective.rep_loss_weight={obj.rep_loss_weight}: the PyTorch reference "
                     "is the Self-Flow step, which needs gamma > 0 (method=self_flow).")
  if spec.train_shift != 1.0:
    raise ValueError(f"train shift {spec.train_shift} of the image modality: the PyTorch "
                     "reference draws unshifted uniform timesteps only.")
  if train_state.has_teacher_ema(config):
    raise ValueError(f"optim.teacher_ema_decay={optim.teacher_ema_decay}: the PyTorch reference "
                     "uses the evaluation EMA as the teacher (the paper setting), set it to -1.")
  height, width, _ = spec.signal_shape
  return Setting(
      shape=flops.model_shape(config, resolved), num_heads=resolved.dims.num_heads,
      patch_size=m.patch_size,
      grid=(height // m.patch_size, width // m.patch_size),
      num_classes=config.data.num_classes, batch=spec.global_batch_size,
      mask_ratio=spec.mask_ratio, condition_dropout=obj.condition_dropout,
      gamma=obj.rep_loss_weight, loss_weight=spec.loss_weight,
      learning_rate=optim.learning_rate, betas=(optim.b1, optim.b2), adam_eps=optim.eps,
      weight_decay=optim.weight_decay, grad_clip_norm=optim.grad_clip_norm,
      ema_decay=optim.ema_decay, seed=config.seed)


def check_math(math: str) -> None:
  if math not in MATHS:
    raise ValueError(f"math={math!r}; allowed: {MATHS}.")


def step_flops(s: Setting, math: str) -> flops.StepFlops:
  """Analytic model FLOPs of one step (self_flow/flops.py's convention: matmuls only, backward =
  2x forward), from flops.py's own layer counts.

  equal: the student's modulation on 2 rows per example and a teacher stopped at its layer on 1
  row, i.e. `flops.train_step_flops` of the config. public: the timestep MLP and every modulation
  on all N tokens, for the student and for a teacher that also runs the blocks after its layer
  and the final layer.
  """
  check_math(math)
  shape, n = s.shape, s.shape.tokens
  if math == "equal":
    student = flops.forward(shape, 2, student=True)
    teacher = flops.forward(shape, 1, student=False)
  else:
    student = flops.forward(shape, n, student=True)
    teacher = (flops.dit_trunk(shape, n, shape.depth)
               + flops.final_layer(n, shape.width, shape.token_dim, n))
  return flops.StepFlops(float(s.batch * student), float(2 * s.batch * student),
                         float(s.batch * teacher))


def available() -> bool:
  """Whether torch is installed (the `bench` extra)."""
  return importlib.util.find_spec("torch") is not None


def require() -> None:
  """Raises, saying how to install it, when torch is missing or would crash the process.

  The default Linux torch wheel (a CUDA build) brings triton, and torch.optim imports triton;
  after TensorFlow is loaded (clu's writers load it) that import ended the process with a
  segmentation fault (torch 2.13 and 2.14, triton 3.8, tensorflow-cpu 2.21). The CPU build has
  no triton.
  """
  if not available():
    raise ModuleNotFoundError(
        "The PyTorch reference step needs torch, an optional benchmark dependency: "
        "pip install -e \".[bench]\" (CPU build: pip install torch --index-url "
        "https://download.pytorch.org/whl/cpu).")
  if "tensorflow" in sys.modules and importlib.util.find_spec("triton") is not None:
    raise RuntimeError(
        "triton is installed (it comes with torch's CUDA build), and torch importing it after "
        "TensorFlow crashes this process with a segmentation fault. Use torch's CPU build "
        "(pip install torch --index-url https://download.pytorch.org/whl/cpu) or "
        "pip uninstall triton.")


def make_step(s: Setting, math: str, latents: np.ndarray, labels: np.ndarray, *,
              threads: int | None = None):
  """A `step.ReferenceStep` (fresh student, EMA teacher and AdamW) on a fixed batch of latents
  (B, H, W, C) and labels (B,); imports torch and, given `threads`, sets its process-wide
  intra-op thread count."""
  check_math(math)
  require()
  import torch  # pylint: disable=g-import-not-at-top
  from self_flow.torch_reference import step  # pylint: disable=g-import-not-at-top
  if threads is not None:
    if threads < 1:
      raise ValueError(f"threads={threads} must be >= 1.")
    torch.set_num_threads(threads)
  return step.ReferenceStep(s, math, latents, labels)


def runtime() -> str:
  """torch's version, intra-op threads and fp32 matmul precision ("highest": no reduced-precision
  matmuls), for the benchmark's environment lines."""
  import torch  # pylint: disable=g-import-not-at-top
  return (f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, fp32 matmul "
          f"precision {torch.get_float32_matmul_precision()}")
