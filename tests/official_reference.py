"""An independent numpy forward of the authors' `SelfFlowPerTokenDiT` on a PyTorch-layout dict.

Written from the official model's layout (method doc §1.1, §1.4, §4 item 19), in float64 and
sharing no code with self_flow, so that agreeing with it checks the converter and our model
together. The official model works on NCHW latents: patches are flattened (c, p, q), the
position embedding is a stored (1, N, D) table, conditioning is per token
c = t_emb(1 - t_token) + y_emb(label), blocks are per-token adaLN-Zero DiT blocks, the head
predicts 2C channels per pixel in (p, q, c) order of which the first C are kept after the shuffle
to (c, p, q), and the public wrapper negates the output. Helpers that build state dicts (the
fixed position table) live here too.
"""

import math

import numpy as np


def position_table(dim: int, grid: int) -> np.ndarray:
  """MAE's 2-D sin-cos table (grid*grid, dim): meshgrid(w, h), first half from grid[0]."""
  coords = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
  halves = []
  for coord in coords:  # coords[0] varies along the columns, coords[1] along the rows.
    args = coord.reshape(-1)[:, None] * omega[None]
    halves.append(np.concatenate([np.sin(args), np.cos(args)], axis=1))
  return np.concatenate(halves, axis=1)


def timestep_embedding(t: np.ndarray, dim: int = 256, max_period: float = 10000.0):
  """DiT's sinusoidal embedding without the x1000 scale, [cos, sin] order."""
  half = dim // 2
  freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / half)
  args = t[..., None] * freqs
  return np.concatenate([np.cos(args), np.sin(args)], axis=-1)


def linear(sd, name: str, x: np.ndarray) -> np.ndarray:
  return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def silu(x):
  return x / (1.0 + np.exp(-x))


def gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def layer_norm(x, eps: float = 1e-6):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + eps)


def patchify(latents: np.ndarray, p: int) -> np.ndarray:
  """(B, C, H, W) -> (B, (H/p)(W/p), C*p*p) with vectors ordered (c, p, q), rows of tokens first."""
  b, c, h, w = latents.shape
  x = latents.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5)
  return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: np.ndarray, p: int, h: int, w: int) -> np.ndarray:
  """Inverse of `patchify`."""
  b, _, dim = tokens.shape
  c = dim // (p * p)
  x = tokens.reshape(b, h // p, w // p, c, p, p).transpose(0, 3, 1, 4, 2, 5)
  return x.reshape(b, c, h, w)


def embed_patches(sd, latents: np.ndarray, p: int) -> np.ndarray:
  """x_embedder: a Conv2d (kernel = stride = p) or a Linear on (c, p, q) patch vectors."""
  weight = sd["x_embedder.proj.weight"]
  if weight.ndim == 4:
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // p, p, w // p, p)
    out = np.einsum("bcipjq,dcpq->bijd", patches, weight)
    return out.reshape(b, -1, weight.shape[0]) + sd["x_embedder.proj.bias"]
  return linear(sd, "x_embedder.proj", patchify(latents, p))


def attention(sd, prefix: str, x: np.ndarray, num_heads: int) -> np.ndarray:
  b, n, d = x.shape
  qkv = linear(sd, f"{prefix}.qkv", x).reshape(b, n, 3, num_heads, d // num_heads)
  q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (B, H, N, hd)
  logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // num_heads)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = (weights @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
  return linear(sd, f"{prefix}.proj", out)


def block(sd, i: int, x: np.ndarray, c: np.ndarray, num_heads: int) -> np.ndarray:
  """Per-token adaLN-Zero DiT block: c (B, N, D) gives shift/scale/gate for every token."""
  mod = linear(sd, f"blocks.{i}.adaLN_modulation.1", silu(c))
  shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = np.split(mod, 6, axis=-1)
  x = x + gate_a * attention(sd, f"blocks.{i}.attn",
                             layer_norm(x) * (1 + scale_a) + shift_a, num_heads)
  hidden = gelu_tanh(linear(sd, f"blocks.{i}.mlp.fc1", layer_norm(x) * (1 + scale_m) + shift_m))
  return x + gate_m * linear(sd, f"blocks.{i}.mlp.fc2", hidden)


def forward(state_dict, latents: np.ndarray, t: np.ndarray, labels: np.ndarray, *,
            num_heads: int, student_layer: int, patch_size: int = 2) -> dict:
  """The official public forward with per-token paper-convention timesteps.

  Args:
    state_dict: PyTorch-layout arrays (official key names).
    latents: (B, C, H, W) noised latents.
    t: (B, N) paper-convention timestep of every token (t = 1 is noise).
    labels: (B,) class labels, num_classes = the null class.
    num_heads: attention heads.
    student_layer: 1-based block after which the projector features are taken.

  Returns:
    {"velocity": (B, C, H, W) paper-convention velocity (noise - data), "hidden": the (B, N, D)
    state after each block, "features": projector output at `student_layer`}.
  """
  sd = {k: np.asarray(v, np.float64) for k, v in state_dict.items()}
  p, (_, channels, h, w) = patch_size, latents.shape
  x = embed_patches(sd, latents.astype(np.float64), p) + sd["pos_embed"]
  t_inner = 1.0 - np.asarray(t, np.float64)  # The wrapper's time flip (SiT convention inside).
  c = (linear(sd, "t_embedder.mlp.2", silu(linear(sd, "t_embedder.mlp.0",
                                                  timestep_embedding(t_inner))))
       + sd["y_embedder.embedding_table.weight"][labels][:, None, :])
  depth = sum(k.endswith("attn.qkv.weight") for k in sd)
  hidden, features = [], None
  for i in range(depth):
    x = block(sd, i, x, c, num_heads)
    hidden.append(x)
    if i + 1 == student_layer:
      features = linear(sd, "projector.linear2", silu(linear(sd, "projector.linear1", x)))
  shift, scale = np.split(linear(sd, "final_layer.adaLN_modulation.1", silu(c)), 2, axis=-1)
  out = linear(sd, "final_layer.linear", layer_norm(x) * (1 + scale) + shift)
  b, n, _ = out.shape
  out_channels = out.shape[-1] // (p * p)
  shuffled = out.reshape(b, n, p, p, out_channels).transpose(0, 1, 4, 2, 3)  # (p q c)->(c p q)
  kept = shuffled[:, :, :channels].reshape(b, n, channels * p * p)  # learn_sigma: first C.
  return {"velocity": -unpatchify(kept, p, h, w), "hidden": hidden, "features": features}
