"""Text conditioning without downloads: a byte-level tokenizer and a small trainable encoder."""
