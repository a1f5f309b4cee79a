"""Analytic FLOPs of one train step: the number behind TFLOP/s per device and MFU.

Why not XLA's cost analysis: it counts the body of a `while` loop once, and every block stack
here runs under `jax.lax.scan`, so for a 12-block segment it reports one block's FLOPs. The count
below is the usual MFU convention instead:

  * only matrix products count, 2 m n k FLOPs each (one multiply-add = 2); bias adds,
    normalisation, activations, softmax, the loss, the optimizer and the EMA are excluded;
  * attention counts its two N x S products, scores Q K^T and the weighted sum of V:
    4 N S D per example and layer (all heads together), with the full S x S even where keys
    are masked, as the kernels compute it;
  * a backward pass costs twice its forward (one product for the input gradient and one for the
    weight gradient per matmul);
  * Self-Flow's teacher is a forward only, stopped at its layer, with one conditioning row per
    example (all its tokens share tau_min); baselines with gamma = 0 have no teacher and no
    projector head (XLA removes the unused head);
  * these are model FLOPs: rematerialisation recomputes forwards, which MFU does not credit;
  * a frozen T5 run in the step (text.encoder="t5") is a forward on every caption, full length.

On the cpu_reference Self-Flow step this gives 362.95 GFLOP; the matmuls XLA actually ran there
(profiler trace counts x HLO dot shapes) came to 362.92 GFLOP.

Per-token adaLN is counted as the model computes it: the modulation Linear runs once per
*distinct* conditioning row (K per example: 1 for vanilla FM, 2 for dual-timestep noising, N for
the naive per-token computation), not once per token.
"""

import dataclasses
from typing import NamedTuple

import ml_collections

from self_flow import config_resolution
from self_flow.text import frozen_encoders, in_step_encoder, t5_encoder

TIMESTEP_FREQ_DIM = 256  # layers.TimestepEmbedder: sinusoidal features before its MLP.
BYTE_ENCODER_MLP_RATIO = 4  # byte_encoder.EncoderBlock uses an MLP of 4x its width.


def dense(rows: int, d_in: int, d_out: int) -> int:
  """A Linear applied to `rows` vectors: one (rows x d_in) @ (d_in x d_out) product."""
  return 2 * rows * d_in * d_out


def attention(q_len: int, kv_len: int, width: int) -> int:
  """Scores (q_len x kv_len) and the weighted sum of values, over all heads of total `width`."""
  return 2 * dense(q_len, width, kv_len)


def timestep_embedder(rows: int, width: int) -> int:
  """Sinusoidal features -> Linear -> SiLU -> Linear, once per distinct timestep row."""
  return dense(rows, TIMESTEP_FREQ_DIM, width) + dense(rows, width, width)


def projector(tokens: int, width: int, hidden: int) -> int:
  """Self-Flow's student head Linear(D -> hidden) -> SiLU -> Linear(hidden -> D)."""
  return dense(tokens, width, hidden) + dense(tokens, hidden, width)


def final_layer(tokens: int, width: int, out_dim: int, rows: int) -> int:
  """adaLN shift/scale on the distinct rows, then the per-token output Linear."""
  return dense(rows, width, 2 * width) + dense(tokens, width, out_dim)


def dit_block(tokens: int, width: int, mlp_dim: int, rows: int) -> int:
  """adaLN-Zero modulation (6 D per distinct row), attention (qkv, scores, proj) and MLP."""
  return (dense(rows, width, 6 * width) + dense(tokens, width, 3 * width)
          + attention(tokens, tokens, width) + dense(tokens, width, width)
          + dense(tokens, width, mlp_dim) + dense(tokens, mlp_dim, width))


def stream(tokens: int, width: int, mlp_dim: int) -> int:
  """One stream of an MMDiT double block without attention: qkv, proj and SwiGLU MLP."""
  return (dense(tokens, width, 3 * width) + dense(tokens, width, width)
          + dense(tokens, width, 2 * mlp_dim) + dense(tokens, mlp_dim, width))


def double_block(img_tokens: int, txt_tokens: int, width: int, mlp_dim: int) -> int:
  """Image and text streams with their own weights, attending over the joint sequence."""
  joint = img_tokens + txt_tokens
  return (stream(img_tokens, width, mlp_dim) + stream(txt_tokens, width, mlp_dim)
          + attention(joint, joint, width))


def single_block(tokens: int, width: int, mlp_dim: int) -> int:
  """Fused block: linear1 -> (qkv, SwiGLU in), attention, linear2 on (attention, MLP)."""
  return (dense(tokens, width, 3 * width + 2 * mlp_dim) + attention(tokens, tokens, width)
          + dense(tokens, width + mlp_dim, width))


def t5_encoder_forward(length: int, encoder: t5_encoder.T5Config) -> int:
  """A frozen T5 encoder on one caption of `length` tokens: per layer the q, k, v, o
  projections, attention over all `length` keys, and the MLP (2 input matrices when gated)."""
  inner = encoder.num_heads * encoder.d_kv
  mlp_inputs = 2 if encoder.feed_forward_proj.startswith("gated") else 1
  layer = (dense(length, encoder.d_model, 3 * inner) + dense(length, inner, encoder.d_model)
           + attention(length, length, inner)
           + dense(length, encoder.d_model, mlp_inputs * encoder.d_ff)
           + dense(length, encoder.d_ff, encoder.d_model))
  return encoder.num_layers * layer


def byte_encoder(length: int, width: int, depth: int) -> int:
  """The trainable caption encoder: `depth` pre-LN blocks (embeddings are gathers)."""
  mlp = BYTE_ENCODER_MLP_RATIO * width
  block = (dense(length, width, 3 * width) + attention(length, length, width)
           + dense(length, width, width) + dense(length, width, mlp) + dense(length, mlp, width))
  return depth * block


@dataclasses.dataclass(frozen=True)
class ModelShape:
  """The sizes of one modality's forward pass that the FLOP count depends on."""

  architecture: str  # dit or mmdit
  tokens: int  # N, generated tokens per example
  token_dim: int  # channels per token (input and output projection)
  width: int  # D
  depth: int
  mlp_dim: int
  student_layer: int  # 1-based, features after this block
  teacher_layer: int
  projector_hidden: int
  num_double: int = 0  # mmdit
  text_tokens: int = 0  # mmdit: caption length L
  text_dim: int = 0  # mmdit: width of what `txt_in` projects (encoder width or embedding dim)
  text_encoder_depth: int = 0  # mmdit with the byte encoder; 0 = frozen or precomputed


def model_shape(config: ml_collections.ConfigDict, resolved: config_resolution.ResolvedConfig,
                modality: str | None = None) -> ModelShape:
  """The shape of `config`'s model on `modality`'s tokens (default: the first modality);
  `resolved` is `config_resolution.resolve(config)`."""
  spec = resolved.spec(modality) if modality else resolved.first_spec
  m, dims = config.model, resolved.dims
  common = dict(architecture=m.architecture, tokens=spec.num_tokens, token_dim=spec.token_dim,
                width=dims.hidden_size, depth=dims.depth,
                mlp_dim=int(dims.hidden_size * m.mlp_ratio),
                student_layer=resolved.student_layer, teacher_layer=resolved.teacher_layer,
                projector_hidden=m.projector_hidden_mult * dims.hidden_size)
  if m.architecture == "dit":
    return ModelShape(**common)
  bytes_encoder = config.text.encoder == "bytes"
  text_tokens, text_dim = frozen_encoders.caption_condition_shape(config.text)
  return ModelShape(num_double=m.num_double, text_tokens=text_tokens, text_dim=text_dim,
                    text_encoder_depth=config.text.depth if bytes_encoder else 0, **common)


def dit_trunk(shape: ModelShape, rows: int, layers: int) -> int:
  """DiT per example: patch embedding, timestep rows and the first `layers` blocks."""
  n, d = shape.tokens, shape.width
  return (dense(n, shape.token_dim, d) + timestep_embedder(rows, d)
          + layers * dit_block(n, d, shape.mlp_dim, rows))


def mmdit_trunk(shape: ModelShape, rows: int, layers: int) -> int:
  """MMDiT per example: embeddings, text stream, shared modulation and the first `layers` blocks
  (double blocks first); modulation of a block kind that is never reached is not computed."""
  n, d, txt = shape.tokens, shape.width, shape.text_tokens
  doubles = min(layers, shape.num_double)
  singles = layers - doubles
  flops = (dense(n, shape.token_dim, d) + timestep_embedder(rows, d)
           + byte_encoder(txt, shape.text_dim, shape.text_encoder_depth)
           + dense(txt, shape.text_dim, d)
           + dense(1, rows, d))  # text conditioning: mean of the image rows
  if doubles:  # shared modulation (image rows, text row), then the blocks
    flops += (dense(rows, d, 6 * d) + dense(1, d, 6 * d)
              + doubles * double_block(n, txt, d, shape.mlp_dim))
  if singles:
    flops += dense(1 + rows, d, 3 * d) + singles * single_block(n + txt, d, shape.mlp_dim)
  return flops


_TRUNKS = {"dit": dit_trunk, "mmdit": mmdit_trunk}


def forward(shape: ModelShape, rows: int, *, student: bool, head: bool = True) -> int:
  """Per-example forward FLOPs with `rows` distinct conditioning rows.

  The student runs every block and the final layer, plus the projector `head` when its features
  are used (XLA drops it from the vanilla and dual-timestep steps, where L_rep is off); the
  teacher stops after its layer: no projector, no final layer.
  """
  if not student:
    return _TRUNKS[shape.architecture](shape, rows, shape.teacher_layer)
  n, d = shape.tokens, shape.width
  flops = (_TRUNKS[shape.architecture](shape, rows, shape.depth)
           + final_layer(n, d, shape.token_dim, rows))
  return flops + (projector(n, d, shape.projector_hidden) if head else 0)


def distinct_rows(noising: str, tokens: int) -> int:
  """Conditioning rows per example the student computes under a noising policy."""
  return {"single": 1, "dual_timestep": 2, "full_masking": 2,
          "diffusion_forcing": tokens}[noising]


class StepFlops(NamedTuple):
  """FLOPs of one optimizer step over the global batch, by part."""

  student_forward: float
  student_backward: float
  teacher_forward: float
  text_encoder_forward: float = 0.0  # the frozen T5 of text.encoder="t5", in the step

  @property
  def total(self) -> float:
    return (self.student_forward + self.student_backward + self.teacher_forward
            + self.text_encoder_forward)


def train_step_flops(config: ml_collections.ConfigDict,
                     resolved: config_resolution.ResolvedConfig, modality: str | None = None,
                     rows: int | None = None) -> StepFlops:
  """FLOPs of one train step of `modality` (default: the first) on its global batch.

  `rows` overrides the student's distinct conditioning rows per example (the benchmark's naive
  per-token adaLN uses `rows` = N).
  """
  spec = resolved.spec(modality) if modality else resolved.first_spec
  shape = model_shape(config, resolved, spec.name)
  rows = rows or distinct_rows(config.objective.noising, shape.tokens)
  batch = spec.global_batch_size
  self_flow = config.objective.rep_loss_weight > 0
  student = batch * forward(shape, rows, student=True, head=self_flow)
  teacher = batch * forward(shape, 1, student=False) if self_flow else 0
  text = (batch * t5_encoder_forward(config.text.max_length,
                                     in_step_encoder.encoder_config(config))
          if in_step_encoder.used(config) else 0)
  return StepFlops(float(student), float(2 * student), float(teacher), float(text))
