"""Byte-level tokenizer: captions <-> fixed-length int32 ids and a validity mask.

Token ids are the UTF-8 bytes shifted by one, so any string is encodable with no downloaded
vocabulary (the offline setting this repository trains in), and id 0 is free for padding, which
is also what the null (dropped) caption of classifier-free guidance uses.
"""

from collections.abc import Sequence

import numpy as np

PAD_ID = 0
VOCAB_SIZE = 257  # 256 byte values + padding.


def _encode(caption: str, max_length: int) -> bytes:
  """UTF-8 bytes of `caption`, truncated to `max_length` on a character boundary.

  Cutting inside a multi-byte character would leave an undecodable tail; the incomplete
  character is dropped instead, so a truncated caption still detokenizes to a prefix.
  """
  data = caption.encode("utf-8")
  if len(data) <= max_length:
    return data
  return data[:max_length].decode("utf-8", errors="ignore").encode("utf-8")


def tokenize(captions: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """Captions -> (tokens int32 (B, L), mask bool (B, L)), truncated or padded to L = max_length.

  `mask` is True at real tokens; padded positions hold `PAD_ID`.
  """
  if isinstance(captions, (str, bytes)):
    raise ValueError(f"captions={captions!r} is a single string; pass a sequence of strings.")
  if not isinstance(max_length, (int, np.integer)) or max_length < 1:
    raise ValueError(f"max_length={max_length!r} must be an integer >= 1.")
  tokens = np.full((len(captions), max_length), PAD_ID, np.int32)
  mask = np.zeros((len(captions), max_length), bool)
  for row, caption in enumerate(captions):
    if not isinstance(caption, str):
      raise ValueError(f"captions[{row}]={caption!r} is a {type(caption).__name__}; "
                       "captions must be str.")
    data = np.frombuffer(_encode(caption, max_length), np.uint8)
    tokens[row, :len(data)] = data.astype(np.int32) + 1
    mask[row, :len(data)] = True
  return tokens, mask


def detokenize(tokens: np.ndarray, mask: np.ndarray) -> list[str]:
  """(B, L) ids and mask -> the B captions (masked-out positions ignored), for logs and grids."""
  tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
  if tokens.ndim != 2 or tokens.shape != mask.shape:
    raise ValueError(f"tokens shape {tokens.shape} and mask shape {mask.shape} must be the same "
                     "(B, L).")
  real = tokens[mask]
  if real.size and (real.min() < 1 or real.max() >= VOCAB_SIZE):
    raise ValueError(f"real tokens must be byte ids in [1, {VOCAB_SIZE - 1}]; got values in "
                     f"[{real.min()}, {real.max()}].")
  return [bytes((row[keep] - 1).astype(np.uint8)).decode("utf-8", errors="replace")
          for row, keep in zip(tokens, mask)]
