"""Attention dispatch: XLA against a plain softmax, platform checks, splash in the Pallas
interpreter (alone and under an 8-device mesh), and the key-mask preparation of cuDNN and splash.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from self_flow import sharding
from self_flow.models import attention
from equivalence import assert_equivalent, assert_fault_detected, rounding_bound


def _qkv(batch=2, tokens=16, heads=2, head_dim=8, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return tuple(jax.random.normal(key, (batch, tokens, heads, head_dim)) for key in keys)


def _key_mask(batch, tokens):
  """Holes like joint attention's: each example's padded text keys sit before the image keys."""
  pos = jnp.arange(tokens)[None]
  padding_start = 2 + 3 * jnp.arange(batch)[:, None]
  return (pos < padding_start) | (pos >= 10)


def _bound(q, backward=False, dtype=np.float32):
  """Rounding bound of attention of `q`'s shape: the logit dot (head_dim terms), the softmax sum
  and the weighted sum of values (tokens each); the backward pass chains about as many again."""
  _, tokens, _, head_dim = q.shape
  return rounding_bound((head_dim + 2 * tokens) * (2 if backward else 1), dtype)


def _check_keys_matter(q, k, v, key_mask, want, bound):
  """The control of an equivalence check: keys shifted by one token against their values (and
  the mask) move the reference output by far more than the rounding bound."""
  faulty = _reference(q, jnp.roll(k, 1, axis=1), v, key_mask)
  assert_fault_detected(faulty, want, bound=bound, fault="keys shifted by one token")


def _reference(q, k, v, key_mask=None):
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if key_mask is not None:
    logits = jnp.where(key_mask[:, None, None, :], logits, -jnp.inf)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


@pytest.mark.parametrize("masked", [False, True])
def test_xla_matches_softmax_reference(masked):
  q, k, v = _qkv()
  key_mask = _key_mask(2, 16) if masked else None
  out = attention.dot_product_attention(q, k, v, key_mask=key_mask, implementation="xla")
  want = _reference(q, k, v, key_mask)
  assert_equivalent(out, want, bound=_bound(q))
  _check_keys_matter(q, k, v, key_mask, want, _bound(q))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_xla_matches_jax_attention_and_its_gradients(dtype, masked):
  """Our written-out XLA attention against jax.nn.dot_product_attention's XLA path, forward and
  backward, in float32 and bfloat16 (whose dots must accumulate in float32 in both passes).

  float32: within the forward-and-backward rounding bound (80 x eps = 9.5e-6; measured at most
  4.1e-7 on jax 0.10.2 and 0.12.1). bfloat16: both sides round the same float32 accumulation
  once, so they differ by at most one bfloat16 epsilon (7.8e-3) of the scale (bit-equal on both
  jax versions). Keys shifted by one token move the result by over 100 x either bound."""
  q, k, v = (x.astype(dtype) for x in _qkv())
  key_mask = _key_mask(2, 16) if masked else None
  cotangent = jax.random.normal(jax.random.PRNGKey(1), q.shape).astype(dtype)

  def ours(q, k, v):
    return attention.xla_attention(q, k, v, key_mask)

  def jax_xla(q, k, v):
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")

  got = jax.vjp(ours, q, k, v)[1](cotangent) + (ours(q, k, v),)
  want = jax.vjp(jax_xla, q, k, v)[1](cotangent) + (jax_xla(q, k, v),)
  assert all(a.dtype == b.dtype == dtype for a, b in zip(got, want))
  bound = (_bound(q, backward=True) if dtype == jnp.float32
           else rounding_bound(1, jnp.bfloat16))
  assert_equivalent(got, want, bound=bound)
  shifted = lambda q, k, v: ours(q, jnp.roll(k, 1, axis=1), v)
  assert_fault_detected(jax.vjp(shifted, q, k, v)[1](cotangent) + (shifted(q, k, v),), want,
                        bound=bound, fault="keys shifted by one token")


def test_auto_is_xla_on_cpu():
  q, k, v = _qkv()
  assert attention.resolve("auto", q) == "xla"
  assert attention.resolve("auto", q.astype(jnp.bfloat16)) == "xla"
  out = attention.dot_product_attention(q, k, v, implementation="auto")
  assert_equivalent(out, _reference(q, k, v), bound=_bound(q))


@pytest.mark.parametrize("name, needs", [("cudnn", "GPU"), ("splash", "TPU")])
def test_accelerator_kernels_refused_on_cpu(name, needs):
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=f"(?s)'{name}'.*{needs}.*'cpu'.*'xla'"):
    attention.dot_product_attention(q, k, v, implementation=name)


def test_unknown_implementation_lists_choices():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="'flash' is unknown.*'xla', 'cudnn', 'splash', 'auto'"):
    attention.dot_product_attention(q, k, v, implementation="flash")


def test_real_keys_first_gives_cudnn_padding_lengths():
  """cuDNN's key mask: reordered keys + lengths; checked here through XLA's lengths support."""
  q, k, v = _qkv()
  key_mask = _key_mask(2, 16)
  k2, v2, lengths = attention.real_keys_first(k, v, key_mask)
  np.testing.assert_array_equal(lengths, key_mask.sum(1))
  out = jax.nn.dot_product_attention(q, k2, v2, key_value_seq_lengths=lengths,
                                     implementation="xla")
  want = _reference(q, k, v, key_mask)
  assert_equivalent(out, want, bound=_bound(q))
  one_short = jax.nn.dot_product_attention(q, k2, v2, key_value_seq_lengths=lengths - 1,
                                           implementation="xla")
  assert_fault_detected(one_short, want, bound=_bound(q), fault="lengths one key short")


def test_splash_segment_ids_hide_padding_and_masked_keys():
  assert attention.splash_segment_ids(None, 2, 128, 128) is None
  key_mask = _key_mask(2, 16)
  ids = attention.splash_segment_ids(key_mask, 2, 16, 128)
  np.testing.assert_array_equal(ids.q, np.zeros((2, 128)))
  np.testing.assert_array_equal(ids.kv[:, :16], ~key_mask)
  np.testing.assert_array_equal(ids.kv[:, 16:], np.ones((2, 112)))
  ids = attention.splash_segment_ids(None, 1, 100, 128)
  np.testing.assert_array_equal(ids.kv[0], np.arange(128) >= 100)


def _splash(q, k, v, key_mask=None):
  return attention.splash_attention(q, k, v, key_mask, interpret=True)


def test_splash_interpreted_matches_reference():
  q, k, v = _qkv(tokens=128, head_dim=32)
  want = _reference(q, k, v)
  assert_equivalent(jax.jit(_splash)(q, k, v), want, bound=_bound(q))
  _check_keys_matter(q, k, v, None, want, _bound(q))


def test_splash_interpreted_on_mesh_pads_masks_and_differentiates():
  """200 tokens (padded to 256) with key holes, batch and heads split over 8 devices, traced
  the way the trainer traces its step (inside `sharding.activation_sharding`)."""
  q, k, v = _qkv(batch=4, tokens=200, heads=4, head_dim=32)
  key_mask = _key_mask(4, 200)
  mesh = sharding.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  q, k, v, key_mask = jax.device_put((q, k, v, key_mask), sharding.batch_sharding(mesh))
  loss = lambda f, q: (f(q, k, v, key_mask) ** 2).sum()
  traced_on_mesh = sharding.activation_sharding(mesh, ())
  step = traced_on_mesh(jax.value_and_grad(lambda q: loss(_splash, q)))
  # On a TPU the kernel only lowers inside a shard_map; interpreted, it would run without one.
  assert "shard_map" in str(jax.make_jaxpr(step)(q))
  out, grad = jax.jit(step)(q)
  want, want_grad = jax.value_and_grad(lambda q: loss(_reference, q))(q)
  np.testing.assert_allclose(out, want, rtol=1e-5)  # a scalar: rtol is relative to it
  assert_equivalent(grad, want_grad, bound=_bound(q, backward=True))
  shifted = lambda q, k, v, key_mask: _reference(q, jnp.roll(k, 1, axis=1), v, key_mask)
  assert_fault_detected(jax.grad(lambda q: loss(shifted, q))(q), want_grad,
                        bound=_bound(q, backward=True), fault="keys shifted by one token")
