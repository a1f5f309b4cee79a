"""Attention by implementation name: the one place that picks a kernel, and the only model op that
reads the device mesh.

q, k, v are (batch, tokens, heads, head_dim); an optional key mask (batch, tokens), True where a
key is real, hides the others (padded text) from every query. Implementations:

  xla     `xla_attention`: two einsums and a float32 softmax, the math of
          `jax.nn.dot_product_attention(implementation="xla")`; any platform, any dtype.
  cudnn   cuDNN flash attention through the same function. GPU only (cuDNN: sm80 or newer); jax
          0.10.2 accepts bf16/fp16 inputs and a head_dim that is a multiple of 8 and at most 256
          on Hopper and later, 128 before. jax would turn a boolean mask into a dense bias that
          cuDNN must see at full (B, 1, T, S) size and also differentiates, so a key mask is
          applied instead by moving the real keys first and passing their count as
          `key_value_seq_lengths` (cuDNN's padding mask); keys may be permuted because RoPE is
          already applied and softmax attention does not depend on key order.
  splash  TPU Pallas splash attention, see `splash_attention`.
  auto    cudnn on GPU when dtype and head_dim allow it; splash on TPU when it can run (below);
          xla otherwise.

Splash and the mesh. XLA cannot partition a Mosaic (TPU Pallas) kernel: in a jit over more than
one device it must run inside a `shard_map` that is manual over every mesh axis ("Mosaic kernels
cannot be automatically partitioned"). The model never names the mesh; this module reads the
ambient one, `jax.sharding.get_abstract_mesh()`, which the trainer installs while tracing the
step (`sharding.activation_sharding` enters `jax.sharding.use_abstract_mesh`). The batch is split
over `sharding.BATCH_AXES` and the heads over the other mesh axes, each only where the size
divides; examples and heads are independent, so every such split is exact and only the
communication differs. With no ambient mesh the kernel is called as is, which is right on one
device.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from self_flow import sharding

IMPLEMENTATIONS = ("xla", "cudnn", "splash", "auto")
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
# Splash tiles the sequence in blocks that must divide it, and its key blocks must be multiples of
# the 128 TPU lanes; sequences are padded to a multiple of 128 and the largest block that divides
# the padded length is used (bigger blocks amortise per-step overhead; not tuned per generation).
SPLASH_LANES = 128
SPLASH_BLOCKS = (512, 256, 128)
HALF_PRECISION_DOTS = {jnp.dtype(jnp.bfloat16): jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
                       jnp.dtype(jnp.float16): jax.lax.DotAlgorithmPreset.F16_F16_F32}


def dot_product_attention(q, k, v, *, key_mask=None, implementation: str):
  """Softmax attention (scale 1/sqrt(head_dim)) by the named implementation; (B, T, H, D) out."""
  name = resolve(implementation, q)
  if name == "splash":
    return splash_attention(q, k, v, key_mask)
  if name == "cudnn":
    return _cudnn(q, k, v, key_mask)
  return xla_attention(q, k, v, key_mask)


def xla_attention(q, k, v, key_mask=None):
  """Softmax attention as two einsums on the token-major (B, T, H, D) operands.

  The math and precision of `jax.nn.dot_product_attention(implementation="xla")` (logits in at
  least float32, scaled, masked keys at the float32 minimum, softmax in float32, probabilities in
  the value dtype), written out because that function vmaps a grouped-query form whose layout
  costs transposes: on one CPU core this form made an attention layer's forward + backward 6%
  faster and the whole Self-Flow train step 3% faster (benchmarks/RESULTS.md, issue 18).
  """
  logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
  # Half-precision inputs accumulate in float32 in both passes, as jax does (jax issue 24047).
  precision = HALF_PRECISION_DOTS.get(jnp.dtype(q.dtype))
  logits = jnp.einsum("bthd,bshd->bhts", q, k, precision=precision,
                      preferred_element_type=logits_dtype) / math.sqrt(q.shape[-1])
  if key_mask is not None:
    logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum("bhts,bshd->bthd", probs, v)


def resolve(implementation: str, q) -> str:
  """The implementation that will run for queries like `q` on the devices being compiled for.

  The platform is that of the step's mesh (`sharding.target_devices`), not the host's default
  backend, so a step compiled ahead of time for a TPU topology on a CPU host picks splash.
  An explicit choice the platform cannot run fails here, at trace time, naming the platform and
  the alternatives, rather than deep inside a kernel.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is unknown; choose one of "
                     f"{IMPLEMENTATIONS}.")
  devices = sharding.target_devices()
  platform = devices[0].platform
  if implementation == "auto":
    if platform == "gpu" and _cudnn_problem(q, devices[0]) is None:
      return "cudnn"
    if platform == "tpu" and _splash_can_run(len(devices)):
      return "splash"
    return "xla"
  if implementation == "cudnn":
    problem = (f"it needs a GPU, but the platform is {platform!r}" if platform != "gpu"
               else _cudnn_problem(q, devices[0]))
    if problem:
      raise ValueError(f"attention implementation 'cudnn' cannot run here: {problem}. Use "
                       "'xla', or 'auto' (cuDNN where it applies, else XLA).")
  if implementation == "splash" and platform != "tpu":
    raise ValueError(f"attention implementation 'splash' is a TPU kernel, but the platform is "
                     f"{platform!r}; use one of 'xla', 'cudnn' (GPU) or 'auto'.")
  return implementation


def _cudnn_problem(q, device) -> str | None:
  """Why jax 0.10.2's cuDNN attention would reject q, or None (jax checks the same at lowering)."""
  if q.dtype not in CUDNN_DTYPES:
    return f"it needs bfloat16 or float16 inputs, got {q.dtype}"
  head_dim, limit = q.shape[-1], _cudnn_head_dim_limit(device)
  if head_dim % 8 or head_dim > limit:
    return f"head_dim must be a multiple of 8 and at most {limit} on this GPU, got {head_dim}"
  return None


def _cudnn_head_dim_limit(device) -> int:
  """256 on Hopper (compute capability 9.0) and later, 128 before (jax's cuDNN check)."""
  capability = getattr(device, "compute_capability", "0.0")
  return 256 if tuple(int(x) for x in capability.split(".")) >= (9, 0) else 128


def _cudnn(q, k, v, key_mask):
  if key_mask is None:
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  k, v, lengths = real_keys_first(k, v, key_mask)
  return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
                                      implementation="cudnn")


def real_keys_first(k, v, key_mask):
  """Reorders each example's keys and values so its real keys come first; returns their count.

  Turns a key mask with holes (padding at the end of the text, before the image) into the
  per-example key lengths that cuDNN's padding mask takes, without a dense (T, S) bias.
  """
  order = jnp.argsort(~key_mask, axis=1, stable=True)[:, :, None, None]
  lengths = key_mask.sum(axis=1, dtype=jnp.int32)
  return (jnp.take_along_axis(k, order, axis=1), jnp.take_along_axis(v, order, axis=1), lengths)


def _splash_can_run(num_devices: int) -> bool:
  """Splash needs the ambient mesh (module docstring) unless everything runs on one device."""
  return not jax.sharding.get_abstract_mesh().empty or num_devices == 1


def splash_attention(q, k, v, key_mask=None, *, interpret: bool = False):
  """TPU splash attention, (B, T, H, D) in and out, with the same result as the XLA path.

  The kernel takes one example as (heads, tokens, head_dim), applies no logit scale, needs the
  sequence in whole blocks and masks by segment ids, so: q is pre-scaled by 1/sqrt(head_dim),
  the kernel is vmapped over the batch, tokens are padded to a multiple of 128, and padded or
  masked keys get their own segment (`splash_segment_ids`). head_dim is one whole tile (any
  size; 128 fills the lanes). `interpret=True` runs the kernel in the Pallas interpreter (tests
  on CPU).
  """
  batch, length, _, head_dim = q.shape
  padded = -(-length // SPLASH_LANES) * SPLASH_LANES
  ids = splash_segment_ids(key_mask, batch, length, padded)
  q = (q.astype(jnp.float32) / math.sqrt(head_dim)).astype(q.dtype)
  q, k, v = (jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0))) for x in (q, k, v))
  local = functools.partial(_splash_local, interpret=interpret)
  return _on_each_device(local, q, k, v, ids)[:, :length]


def splash_segment_ids(key_mask, batch: int, length: int, padded: int):
  """Per-example segment ids that hide padded and masked keys, or None when nothing is hidden.

  Splash lets a query see a key only when their segment ids match: every query is in segment 0,
  real keys too, hidden keys in segment 1. A query of an example without real keys would have an
  empty softmax row; joint attention always has image keys.
  """
  if key_mask is None and padded == length:
    return None
  real = jnp.ones((batch, length), bool) if key_mask is None else key_mask
  real = jnp.pad(real, ((0, 0), (0, padded - length)))
  return splash.SegmentIds(q=jnp.zeros((batch, padded), jnp.int32), kv=(~real).astype(jnp.int32))


def _splash_local(q, k, v, ids, *, interpret: bool):
  """Splash on this device's (B, T, H, D) shard; T is a multiple of 128 (see splash_attention)."""
  _, length, heads, _ = q.shape
  block = next(b for b in SPLASH_BLOCKS if length % b == 0)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  mask = splash.MultiHeadMask([splash.FullMask((length, length))] * heads)
  kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)
  per_example = lambda q, k, v, ids: kernel(q, k, v, segment_ids=ids)
  heads_first = lambda x: x.transpose(0, 2, 1, 3)
  out = jax.vmap(per_example)(heads_first(q), heads_first(k), heads_first(v), ids)
  return heads_first(out).astype(q.dtype)


def _on_each_device(fn, q, k, v, ids):
  """fn under a shard_map over the ambient mesh (batch and heads split), or fn when none is set.

  check_vma is off: the body has no collectives, so there is nothing for it to check.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(q, k, v, ids)
  batch_axes = _dividing_axes(mesh, sharding.BATCH_AXES, q.shape[0])
  other_axes = tuple(a for a in mesh.axis_names if a not in sharding.BATCH_AXES)
  head_axes = _dividing_axes(mesh, other_axes, q.shape[2])
  qkv, rows = P(batch_axes, None, head_axes, None), P(batch_axes, None)
  ids_spec = None if ids is None else splash.SegmentIds(q=rows, kv=rows)
  return jax.shard_map(fn, in_specs=(qkv, qkv, qkv, ids_spec), out_specs=qkv,
                       check_vma=False)(q, k, v, ids)


def _dividing_axes(mesh, names, size: int):
  """The longest prefix of the named mesh axes whose total size divides `size`, or None."""
  axes, total = [], 1
  for name in names:
    if name not in mesh.axis_names or size % (total * mesh.shape[name]):
      break
    axes.append(name)
    total *= mesh.shape[name]
  return tuple(axes) or None
