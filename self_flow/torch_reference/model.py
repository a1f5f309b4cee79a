"""The per-token-timestep DiT of Self-Flow in PyTorch, fp32 (the benchmark's reference model).

Layer for layer the model of self_flow/models (dit.py, layers.py): Linear patch embedding plus
fixed sin-cos positions, timestep MLP on [cos, sin] frequencies of t (no x1000) plus a label table
with a null row, adaLN-Zero blocks (LayerNorm without affine, eps 1e-6; qkv-bias attention; GELU
tanh MLP), adaLN final layer and the SimpleHead projector, with DiT initialisation. Parameter
names follow ours (blocks numbered instead of stacked), so weights convert one to one.

Conditioning arrives as rows (B, K, D) with an optional per-token row index (B, N). Each
modulation Linear runs on the K rows it is given; with an index its output is gathered per token,
without one it broadcasts (K = 1) or already is per token (K = N). The public-trainer math passes
one row per token; ours passes the distinct rows.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from self_flow import torch_reference

FREQ_DIM = 256  # sinusoidal timestep features before the MLP


def per_token(rows: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
  """(B, K, F) rows -> what each token uses: gathered by index (B, N), else the rows themselves
  (K = 1 broadcasts in the elementwise ops, K = N is already per token)."""
  if index is None:
    return rows
  return torch.gather(rows, 1, index.unsqueeze(-1).expand(-1, -1, rows.shape[-1]))


def layer_norm(x: torch.Tensor) -> torch.Tensor:
  return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def modulate(x, shift, scale):
  return x * (1 + scale) + shift


def timestep_frequencies(t: torch.Tensor) -> torch.Tensor:
  half = FREQ_DIM // 2
  freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
  args = t.float().unsqueeze(-1) * freqs
  return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def position_embedding(grid: tuple[int, int], width: int) -> torch.Tensor:
  """(N, D) fixed sin-cos table, row-major patches: [sin, cos] of the row, then of the column."""
  part = width // 2
  omega = 1.0 / 10_000 ** (torch.arange(part // 2, dtype=torch.float32) / (part / 2))
  rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
  parts = []
  for coord in (rows, cols):
    args = coord.reshape(-1, 1).float() * omega
    parts += [torch.sin(args), torch.cos(args)]
  return torch.cat(parts, dim=-1)


class TimestepEmbedder(nn.Module):

  def __init__(self, width: int):
    super().__init__()
    self.fc1 = nn.Linear(FREQ_DIM, width)
    self.fc2 = nn.Linear(width, width)

  def forward(self, t):
    return self.fc2(F.silu(self.fc1(timestep_frequencies(t))))


class Attention(nn.Module):

  def __init__(self, width: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.qkv = nn.Linear(width, 3 * width)
    self.proj = nn.Linear(width, width)

  def forward(self, x):
    b, n, d = x.shape
    q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, head_dim)
    return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):

  def __init__(self, width: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(width, hidden)
    self.fc2 = nn.Linear(hidden, width)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
  """adaLN-Zero DiT block; modulation on the conditioning rows, then per token."""

  def __init__(self, width: int, num_heads: int, mlp_dim: int):
    super().__init__()
    self.attn = Attention(width, num_heads)
    self.mlp = Mlp(width, mlp_dim)
    self.modulation = nn.Linear(width, 6 * width)

  def forward(self, x, cond, index):
    mod = per_token(self.modulation(F.silu(cond)), index)
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)
    x = x + gate_a * self.attn(modulate(layer_norm(x), shift_a, scale_a))
    return x + gate_m * self.mlp(modulate(layer_norm(x), shift_m, scale_m))


class FinalLayer(nn.Module):

  def __init__(self, width: int, out_dim: int):
    super().__init__()
    self.modulation = nn.Linear(width, 2 * width)
    self.linear = nn.Linear(width, out_dim)

  def forward(self, x, cond, index):
    shift, scale = per_token(self.modulation(F.silu(cond)), index).chunk(2, dim=-1)
    return self.linear(modulate(layer_norm(x), shift, scale))


class ProjectionHead(nn.Module):
  """The student projector (official SimpleHead): Linear -> SiLU -> Linear."""

  def __init__(self, width: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(width, hidden)
    self.fc2 = nn.Linear(hidden, width)

  def forward(self, x):
    return self.fc2(F.silu(self.fc1(x)))


class DiT(nn.Module):
  """Self-Flow's DiT; `forward` returns the hidden state at a tap layer and the velocity."""

  def __init__(self, s: "torch_reference.Setting"):
    super().__init__()
    shape = s.shape
    d = shape.width
    self.input_proj = nn.Linear(shape.token_dim, d)
    self.t_embedder = TimestepEmbedder(d)
    self.label_embed = nn.Embedding(s.num_classes + 1, d)  # row num_classes: the null class
    self.blocks = nn.ModuleList(
        Block(d, s.num_heads, shape.mlp_dim) for _ in range(shape.depth))
    self.final_layer = FinalLayer(d, shape.token_dim)
    self.projector = ProjectionHead(d, shape.projector_hidden)
    self.register_buffer("pos_embed", position_embedding(s.grid, d), persistent=False)

  def condition(self, t_rows, labels):
    """(B, K) timesteps, (B,) labels -> (B, K, D) conditioning rows."""
    return self.t_embedder(t_rows) + self.label_embed(labels).unsqueeze(1)

  def forward(self, x, t_rows, t_index, labels, *, tap: int, stop: int | None = None):
    """(hidden after block `tap` (1-based), velocity) for tokens x (B, N, C).

    t_rows (B, K) with t_index (B, N) or None, as `per_token` takes them. With `stop` the
    forward ends after that many blocks and returns no velocity (the truncated teacher).
    """
    cond = self.condition(t_rows, labels)
    h = self.input_proj(x) + self.pos_embed
    tapped = None
    for i, block in enumerate(self.blocks[:stop]):
      h = block(h, cond, t_index)
      if i + 1 == tap:
        tapped = h
    if stop is not None:
      return tapped, None
    return tapped, self.final_layer(h, cond, t_index)


@torch.no_grad()
def dit_init(model: DiT, generator: torch.Generator) -> None:
  """DiT initialisation, as self_flow/models: Xavier-uniform Linears with zero biases, N(0, 0.02)
  timestep MLP and label table, zero adaLN modulation and final layer."""
  for module in model.modules():
    if isinstance(module, nn.Linear):
      nn.init.xavier_uniform_(module.weight, generator=generator)
      nn.init.zeros_(module.bias)
  for weight in (model.t_embedder.fc1.weight, model.t_embedder.fc2.weight,
                 model.label_embed.weight):
    nn.init.normal_(weight, std=0.02, generator=generator)
  zero = [block.modulation for block in model.blocks]
  zero += [model.final_layer.modulation, model.final_layer.linear]
  for module in zero:
    nn.init.zeros_(module.weight)
