"""Pre-encoded training data: signal latents and caption embeddings in ArrayRecord shards.

Pod-scale text-to-image, text-to-video and text-to-audio runs never run the autoencoder or the
large frozen text encoder (e.g. T5) in the training loop: a one-off job (`writer.write_shards`,
CLI `self_flow.tools.write_latent_shards`) encodes every example once and the trainer reads the
results by index through grain (`reader.LatentShardSource`). The modules of this package:

* `layout`: the on-disk format below (names, metadata, modalities), shared by writer and reader.
* `encoders`: the encoder signatures `write_shards` takes, and small built-in encoders.
* `writer`: `write_shards`, single- or multi-process.
* `reader`: `LatentShardSource`, the grain source, and its bad-record policies.
* `posterior`: grain transforms drawing latents from a stored posterior.
* `caption_draw`: the grain transform picking one of several stored captions per epoch.

On-disk format (version 3). A directory, local or on Cloud Storage (gs://...), holding:

* `{split}-{i:05d}-of-{n:05d}.array_record` for i in [0, n): the shards of `split`, written
  with ArrayRecord options `group_size:1` (one record per chunk, which random access needs).
  Shard i holds the consecutive examples `layout.shard_range(i, n, N)` of the N written, and
  `LatentShardSource` index k reads example k back, so sources keep the written order.
  (Version 2 directories, whose shard k % n held example k, are still read.)
* `manifests/{shard file}.json`, one per finished shard: the job that wrote it (modality,
  encoders, scale, shift, N, n), its record count and fields, and who wrote it when. A shard
  counts as written only once its manifest exists, so a rerun of an interrupted job writes only
  the shards that have none.
* `metadata.json`, written last (atomically) and merged when more splits are added::

    {"format": "self_flow.latent_shards", "version": 2, "modality": "image",
     "fields": {"latent": {"shape": [h, w, c], "dtype": "float16"},
                "text_embedding": {"shape": [L, D], "dtype": "float16"},
                "text_mask": {"shape": [L], "dtype": "bool"},
                "caption": {"shape": [], "dtype": "utf-8 bytes"},
                "label": {"shape": [], "dtype": "int32"}},
     "latent_scale": 1.0, "latent_shift": 0.0,
     "signal_encoder": "avgpool2", "text_encoder": "bytes",
     "splits": {"train": {"num_examples": N, "num_shards": n, "shard_lengths": [...]}}}

  A split's shards are usable only once its entry is in `metadata.json`; a directory without
  the file, or a split missing from it, was not (completely) written and is refused.

  With P writer processes (`write_shards(process_index=p, process_count=P, barrier=...)`),
  process p writes the shards i = p, p + P, ..., reading only their examples; process 0 merges
  metadata.json from the manifests after all have finished.

One directory holds one modality (`layout.MODALITIES`), whose latents have the rank the
trainer's tokenizer of that modality expects:

* image: examples carry `image` uint8 (H, W, C); latents are (h, w, c).
* video: examples carry `video` uint8 (T, H, W, C); latents are (t, h, w, c).
* audio: examples carry `waveform` int16 (samples,); latents are (frames, channels).

Pixels reach the signal encoder as float32 in [-1, 1], waveforms as float32 in [-1, 1).

Each record is `flax.serialization.msgpack_serialize` of a dict of numpy arrays:

* `latent` float16: `(signal_encoder(signal) - latent_shift) * latent_scale`, the convention
  of SD3/FLUX autoencoders, applied at write time so the trainer reads latents ready for the
  model.
* `latent_std` float16, only when the signal encoder returns a Gaussian posterior (mean, std),
  e.g. the SD-VAE: `latent` is then the scaled posterior mean and `latent_std` the scaled std
  (`std * |latent_scale|`), so the trainer can draw a fresh latent every epoch
  (`posterior.PosteriorSample`). Listed in `fields` when present; readers that ignore it see
  the mean.
* `text_embedding` (L, D) float16 and `text_mask` (L,) bool (True = real token), from the text
  encoder.
* `caption` utf-8 bytes, kept for sampling prompts and debugging.
* `label` int32 scalar: the class id, -1 when the dataset has none.

Options recorded in metadata.json (`captions_per_example`, `text_dtype`) and per split (`job`:
what wrote it; `skipped`: inputs not written, counted by reason):

* `text_dtype` "bfloat16" stores `text_embedding` as bfloat16 (half the bytes of float32, with
  its range) instead of float16.
* A text encoder returning token ids gives `text_tokens` int32 (L,) in place of
  `text_embedding`: the frozen encoder then runs in the train step.
* `captions_per_example` C > 0 stores up to C captions per example: the text fields gain a
  leading C axis ((C, L, D), (C, L)), rows beyond the example's own captions masked out;
  `num_captions` int32 says how many are real and `captions` holds them as a UTF-8 JSON list.
  Training draws one per example per epoch (`caption_draw.DrawCaption`).
* Shards written by `writer.write_units` (one per input unit) may hold any number of records,
  none included; `shard_lengths` says how many.
"""
