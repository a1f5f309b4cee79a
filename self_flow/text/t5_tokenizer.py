"""The tokenizer of a Hugging Face T5 / UMT5 encoder, run from its tokenizer.json.

Why: an encoder's embeddings are only right for the ids it was trained on, so captions must get
exactly the ids of transformers' tokenizer as text-to-image pipelines call it
(`AutoTokenizer.from_pretrained(dir)(captions, padding="max_length", truncation=True,
max_length=L)`). The `tokenizers` package (Rust; no torch, no sentencepiece) runs the model
directory's tokenizer.json, local or on gs://, with T5's post-processor, as transformers'
T5Tokenizer sets it: one `</s>` after every caption, kept last when a long caption is cut to
`max_length`; then `<pad>` up to `max_length`.
"""

from collections.abc import Mapping, Sequence

import numpy as np
import tokenizers
from tokenizers import processors

from self_flow import storage

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SENTENCEPIECE_FILE = "spiece.model"
# Special tokens of T5 and UMT5 (transformers' defaults) unless tokenizer_config.json names others.
_DEFAULT_TOKENS = {"eos_token": "</s>", "pad_token": "<pad>"}


def _token_text(value) -> str:
  """A special token of tokenizer_config.json: a string, or an AddedToken {"content": ...}."""
  return value["content"] if isinstance(value, Mapping) else str(value)


class T5Tokenizer:
  """Captions -> fixed-length T5 token ids and mask, identical to transformers' T5Tokenizer."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, eos_token: str = "</s>",
               pad_token: str = "<pad>", source: str = "the tokenizer"):
    """Wraps `tokenizer` (its post-processor is replaced by T5's, as transformers does)."""
    ids = {token: tokenizer.token_to_id(token) for token in (eos_token, pad_token)}
    absent = [token for token, token_id in ids.items() if token_id is None]
    if absent:
      raise ValueError(f"{source} has no {absent} in its vocabulary; T5 tokenizers need the end "
                       f"token {eos_token!r} and the padding token {pad_token!r}.")
    self.eos_id, self.pad_id, self.pad_token = ids[eos_token], ids[pad_token], pad_token
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", eos_token], pair=["$A", eos_token, "$B", eos_token],
        special_tokens=[(eos_token, self.eos_id)])
    self._tokenizer = tokenizer

  @classmethod
  def from_directory(cls, path: str) -> "T5Tokenizer":
    """The tokenizer of a Hugging Face model or tokenizer directory (local or a URL): its
    tokenizer.json, with the special tokens its tokenizer_config.json names, if it has one.

    Raises:
      FileNotFoundError: `path` has no tokenizer.json.
    """
    file = storage.join(path, TOKENIZER_FILE)
    if not storage.exists(file):
      raise FileNotFoundError(
          f"{file!r} is missing: the T5 tokenizer is read from the fast-tokenizer file "
          f"{TOKENIZER_FILE}. A directory with only a sentencepiece {SENTENCEPIECE_FILE} must "
          "be converted first, once, with transformers and sentencepiece installed: "
          "`transformers.AutoTokenizer.from_pretrained(dir).save_pretrained(dir)` writes "
          f"{TOKENIZER_FILE} beside it.")
    config_file = storage.join(path, TOKENIZER_CONFIG_FILE)
    config = storage.read_json(config_file) if storage.exists(config_file) else {}
    tokens = {key: _token_text(config.get(key) or default)
              for key, default in _DEFAULT_TOKENS.items()}
    return cls(tokenizers.Tokenizer.from_str(storage.read_text(file)), **tokens,
               source=repr(file))

  def tokenize(self, captions: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Captions -> (ids int32 (B, max_length), mask bool (B, max_length)).

    Each caption's pieces, cut to max_length - 1, then `</s>`, then padding: the ids of
    transformers' tokenizer with padding="max_length", truncation=True. `mask` is True at the
    pieces and `</s>`.
    """
    if isinstance(captions, (str, bytes)):
      raise ValueError(f"captions={captions!r} is a single string; pass a sequence of strings.")
    if not isinstance(max_length, (int, np.integer)) or max_length < 1:
      raise ValueError(f"max_length={max_length!r} must be an integer >= 1.")
    for row, caption in enumerate(captions):
      if not isinstance(caption, str):
        raise ValueError(f"captions[{row}]={caption!r} is a {type(caption).__name__}; "
                         "captions must be str.")
    self._tokenizer.enable_truncation(int(max_length))
    self._tokenizer.enable_padding(length=int(max_length), pad_id=self.pad_id,
                                   pad_token=self.pad_token)
    encodings = self._tokenizer.encode_batch(list(captions))
    shape = (len(encodings), int(max_length))
    ids = np.array([e.ids for e in encodings], np.int32).reshape(shape)
    mask = np.array([e.attention_mask for e in encodings], bool).reshape(shape)
    return ids, mask
