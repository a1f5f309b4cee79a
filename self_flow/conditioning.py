"""Per-sample conditioning read from a batch: class labels or text, CFG dropout and the null.

Class conditioning is an int array (B,) whose null is the extra class `num_classes`. An
unconditional model ("none") is a class-conditional one with no classes: every sample gets its
one label row, the null 0, whatever labels the data carries, so it learns p(x) with no semantics
handed to its blocks through adaLN. Text
conditioning is a dict with "mask" (B, L) and either "tokens" (B, L) byte ids for the trainable
encoder or "embedding" (B, L, D) precomputed by a frozen encoder; its null is the empty caption
(all-False mask, padding tokens, zero embedding). Dropout is drawn once and used by both the
student and the teacher (maintainer, issue #10).
"""

import jax
import jax.numpy as jnp

KINDS = ("class", "text", "none")


def model_classes(config) -> int:
  """The classes the model embeds besides its null: data.num_classes, or 0 when unconditional
  (model.conditioning="none"), whose null (and only) label is then 0."""
  return 0 if config.model.conditioning == "none" else config.data.num_classes


def from_batch(batch: dict, kind: str):
  """The conditioning the model takes, from the batch fields the data pipeline produces."""
  if kind == "class":
    return batch["label"]
  if kind == "none":  # the null label 0 for every sample; the data's labels are not read
    return jnp.zeros(jax.tree.leaves(batch)[0].shape[:1], jnp.int32)
  if kind == "text":
    if "text_embedding" in batch:  # latent shards hand over their 16-bit storage dtype: widen
      return {"embedding": batch["text_embedding"].astype(jnp.float32),  # exact
              "mask": batch["text_mask"]}
    return {"tokens": batch["text_tokens"], "mask": batch["text_mask"]}
  raise ValueError(f"model.conditioning={kind!r}; allowed: {KINDS}.")


def _replace(cond, keep, null_class: int):
  """Keeps rows where `keep` (B,) is True and puts the null condition elsewhere."""
  if not isinstance(cond, dict):
    return jnp.where(keep, cond, null_class)
  out = {"mask": cond["mask"] & keep[:, None]}
  if "tokens" in cond:
    out["tokens"] = jnp.where(keep[:, None], cond["tokens"], 0)
  if "embedding" in cond:
    out["embedding"] = jnp.where(keep[:, None, None], cond["embedding"], 0)
  return out


def drop(key, cond, *, probability: float, null_class: int):
  """CFG dropout: each sample's condition becomes the null with `probability`."""
  batch = jax.tree.leaves(cond)[0].shape[0]
  return _replace(cond, jax.random.uniform(key, (batch,)) >= probability, null_class)


def null_like(cond, null_class: int):
  """The unconditional counterpart of `cond` (same structure and shapes)."""
  batch = jax.tree.leaves(cond)[0].shape[0]
  return _replace(cond, jnp.zeros((batch,), bool), null_class)
