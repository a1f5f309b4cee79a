"""Tests for text conditioning: byte tokenizer, generated captions and the byte text encoder."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from self_flow.data import captions
from self_flow.data.fashion_mnist_local import CLASS_NAMES
from self_flow.models import byte_encoder
from self_flow.text import tokenizer

_MAX_LENGTH = 32
_CAPTION_LENGTH = 48  # self_flow/base_config.py text.max_length: every generated caption fits whole.


def test_tokenize_round_trips_ascii_and_non_ascii():
  texts = ["a photo of a tee", "Ünïcödé — 日本語 ✓", ""]
  tokens, mask = tokenizer.tokenize(texts, 64)
  assert tokens.dtype == np.int32 and mask.dtype == bool and tokens.shape == (3, 64)
  assert tokenizer.detokenize(tokens, mask) == texts
  assert mask.sum(1).tolist() == [len(t.encode("utf-8")) for t in texts]
  assert tokens.max() < tokenizer.VOCAB_SIZE


def test_tokenize_pads_and_truncates():
  tokens, mask = tokenizer.tokenize(["ab", "abcdefgh"], 4)
  np.testing.assert_array_equal(tokens, [[ord("a") + 1, ord("b") + 1, 0, 0],
                                         [ord(c) + 1 for c in "abcd"]])
  np.testing.assert_array_equal(mask, [[True, True, False, False], [True] * 4])
  assert (tokens[~mask] == tokenizer.PAD_ID).all()
  # A multi-byte character cut by the limit is dropped whole, so the prefix still decodes.
  tokens, mask = tokenizer.tokenize(["ab日本"], 4)
  assert tokenizer.detokenize(tokens, mask) == ["ab"] and mask.sum() == 2


@pytest.mark.parametrize("captions_arg, max_length", [("abc", 4), (["abc"], 0), ([b"abc"], 4)])
def test_tokenize_rejects_bad_input(captions_arg, max_length):
  with pytest.raises(ValueError):
    tokenizer.tokenize(captions_arg, max_length)


def _many_train_captions(label, count=200, seed=0):
  rng = np.random.default_rng(seed)
  return [captions.train_caption(label, rng) for _ in range(count)]


def test_captions_vary_name_class_and_keep_heldout_templates_out_of_training():
  assert len(captions.NAMES) == len(CLASS_NAMES)
  assert not set(captions.TRAIN_TEMPLATES) & set(captions.HELDOUT_TEMPLATES)
  heldout_fragments = [part for template in captions.HELDOUT_TEMPLATES
                       for part in template.split("{}") if part.strip()]
  for label in range(len(CLASS_NAMES)):
    train = _many_train_captions(label)
    assert len(set(train)) >= 10, (label, set(train))
    assert len({name for name in captions.NAMES[label] if any(name in c for c in train)}) >= 3
    heldout = [captions.heldout_caption(label, i) for i in range(20)]
    assert heldout == [captions.heldout_caption(label, i) for i in range(20)]
    assert len(set(heldout)) == len(captions.HELDOUT_TEMPLATES) * len(captions.NAMES[label])
    for caption in train + heldout:
      assert any(name in caption for name in captions.NAMES[label]), caption
    for caption in train:
      assert not any(fragment in caption for fragment in heldout_fragments), caption
    assert not set(train) & set(heldout)
    assert max(len(c.encode("utf-8")) for c in train + heldout) <= _CAPTION_LENGTH


def test_heldout_captions_cover_every_phrasing_when_labels_cycle_with_index():
  labels = np.arange(100) % 10
  per_class = {}
  for i, label in enumerate(labels):
    per_class.setdefault(int(label), set()).add(captions.heldout_caption(int(label), i))
  assert all(len(seen) == 9 for seen in per_class.values())


@pytest.mark.parametrize("call", [lambda: captions.heldout_caption(10, 0),
                                  lambda: captions.heldout_caption(0, -1),
                                  lambda: captions.train_caption(-1, np.random.default_rng(0)),
                                  lambda: captions.CaptionTokens(0)])
def test_captions_reject_bad_input(call):
  with pytest.raises(ValueError):
    call()


def _caption_stream(seed, epochs=2):
  records = [{"image": np.zeros((2, 2, 1), np.float32), "label": np.int32(i % 10)}
             for i in range(10)]
  dataset = (grain.MapDataset.source(records).seed(seed).repeat(epochs)
             .random_map(captions.CaptionTokens(_CAPTION_LENGTH)))
  return [dataset[i] for i in range(len(dataset))]


def test_caption_tokens_in_grain_are_seeded_and_vary_per_epoch():
  first, again, other = _caption_stream(0), _caption_stream(0), _caption_stream(1)
  record = first[3]
  assert set(record) == {"image", "label", "text_tokens", "text_mask"}
  assert record["text_tokens"].dtype == np.int32 and record["text_mask"].dtype == bool
  assert record["text_tokens"].shape == record["text_mask"].shape == (_CAPTION_LENGTH,)

  def texts(stream):
    return tokenizer.detokenize(np.stack([r["text_tokens"] for r in stream]),
                                np.stack([r["text_mask"] for r in stream]))

  assert texts(first) == texts(again)
  assert texts(first) != texts(other)
  assert texts(first)[:10] != texts(first)[10:]  # same records, a new epoch: new phrasings
  for text, r in zip(texts(first), first):
    assert any(name in text for name in captions.NAMES[int(r["label"])])


@pytest.fixture(scope="module")
def encoder():
  return byte_encoder.ByteTextEncoder(width=32, depth=2, num_heads=4, max_length=_MAX_LENGTH,
                                      dtype=jnp.float32, param_dtype=jnp.float32,
                                      rngs=nnx.Rngs(0))


def _tokens(texts):
  tokens, mask = tokenizer.tokenize(texts, _MAX_LENGTH)
  return jnp.asarray(tokens), jnp.asarray(mask)


def test_encoder_output_shape_dtype_and_distinct_captions(encoder):
  tokens, mask = _tokens(["a photo of a tee", "a photo of a boot"])
  out = encoder(tokens, mask)
  assert out.shape == (2, _MAX_LENGTH, 32) and out.dtype == jnp.float32
  assert np.abs(np.asarray(out[0] - out[1])).max() > 1e-3
  bf16 = byte_encoder.ByteTextEncoder(width=32, depth=1, num_heads=4, max_length=_MAX_LENGTH,
                                      dtype=jnp.bfloat16, param_dtype=jnp.float32,
                                      rngs=nnx.Rngs(0))
  assert bf16(tokens, mask).dtype == jnp.bfloat16


def test_encoder_ignores_padding_and_keeps_empty_rows_finite(encoder):
  tokens, mask = _tokens(["a bag", "", "a dress on a black background"])
  out = encoder(tokens, mask)
  garbage = jnp.where(mask, tokens, jax.random.randint(jax.random.PRNGKey(0), tokens.shape, 1,
                                                       tokenizer.VOCAB_SIZE))
  out_garbage = encoder(garbage, mask)
  # Masked keys get exactly zero attention weight: padding changes no bit of the real tokens.
  np.testing.assert_array_equal(np.asarray(out_garbage)[np.asarray(mask)],
                                np.asarray(out)[np.asarray(mask)])
  assert np.isfinite(np.asarray(out_garbage)).all()
  assert not np.asarray(out)[~np.asarray(mask)].any()  # padded outputs are zero


def test_encoder_gradients_reach_embedding_and_jit_with_split_merge(encoder):
  tokens, mask = _tokens(["a sneaker", ""])
  graphdef, params, rest = nnx.split(encoder, nnx.Param, ...)

  @jax.jit
  def loss_and_grad(params, tokens, mask):
    def loss(params):
      return jnp.sum(nnx.merge(graphdef, params, rest)(tokens, mask) ** 2)
    return jax.value_and_grad(loss)(params)

  value, grads = loss_and_grad(params, tokens, mask)
  np.testing.assert_allclose(value, jnp.sum(encoder(tokens, mask) ** 2), rtol=1e-5)
  table_grad = np.asarray(grads["embed"]["embedding"].value)
  assert np.isfinite(table_grad).all()
  used = np.unique(np.asarray(tokens)[np.asarray(mask)])
  assert np.abs(table_grad[used]).sum(1).min() > 0
  assert not table_grad[tokenizer.PAD_ID].any()  # padding never reaches the loss


def test_encoder_rejects_bad_configuration_and_long_input(encoder):
  with pytest.raises(ValueError, match="num_heads"):
    byte_encoder.ByteTextEncoder(width=30, depth=1, num_heads=4, max_length=8,
                                 dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  tokens, mask = tokenizer.tokenize(["x"], _MAX_LENGTH + 1)
  with pytest.raises(ValueError, match="max_length"):
    encoder(jnp.asarray(tokens), jnp.asarray(mask))
