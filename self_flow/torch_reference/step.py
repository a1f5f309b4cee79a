"""One Self-Flow train step in PyTorch (method doc §1.13), in the public or our (equal) math.

The loss is ours term for term (self_flow/train_step.py, objectives.py): tokens patchified as
(p, q, c); labels dropped to the null class with the CFG probability; t, s ~ U[0, 1) per example,
unsorted, mask ~ Bernoulli(R_M) per token, one noise draw x1; x_tau per token, teacher input at
tau_min = min(t, s) (the paper's rule, objective.teacher_time="min_ts"); L_gen = mean (v - (x1 - x0))^2; L_rep = 1 - mean per-token
cosine (norm product clamped at 1e-6) between the projected student layer and the raw teacher
layer; L = w (L_gen + gamma L_rep). The update is optax's clip_by_global_norm (scale by
max_norm / norm above the bound, no epsilon) then AdamW, then the EMA
theta' <- theta' + (1 - decay)(theta - theta') over every parameter, projector included; the EMA
is the teacher.
"""

import copy
from typing import NamedTuple

import numpy as np
import torch

from self_flow import torch_reference
from self_flow.torch_reference import model as model_lib


class Draw(NamedTuple):
  """The step's randomness and data, what both maths consume (ours: train_step.Examples)."""

  x0: torch.Tensor  # (B, N, C) clean tokens
  x1: torch.Tensor  # (B, N, C) noise
  labels: torch.Tensor  # (B,) int64, after CFG dropout
  t: torch.Tensor  # (B,)
  s: torch.Tensor  # (B,)
  mask: torch.Tensor  # (B, N) bool: token takes s


def patchify(latents: torch.Tensor, p: int) -> torch.Tensor:
  """(B, H, W, C) -> (B, (H/p)(W/p), p*p*C), row-major patches, channels (p, q, c)."""
  b, h, w, c = latents.shape
  x = latents.reshape(b, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
  """Per-token cosine over the last dim, norm product clamped at 1e-6 (objectives.py)."""
  den = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
  return (a * b).sum(-1) / den.clamp_min(1e-6)


class Losses(NamedTuple):
  """The loss terms of one draw, and the teacher features they used (tests compare them)."""

  loss: torch.Tensor
  loss_gen: torch.Tensor
  loss_rep: torch.Tensor
  teacher: torch.Tensor  # (B, N, D) raw teacher features


def losses(student: model_lib.DiT, teacher: model_lib.DiT, setting: torch_reference.Setting,
           math: str, draw: Draw) -> Losses:
  """The Self-Flow loss of one draw; the teacher runs under no_grad."""
  x0, x1, labels, t, s, mask = draw
  shape = setting.shape
  tau = torch.where(mask, s.unsqueeze(1), t.unsqueeze(1))  # (B, N)
  x_tau = (1.0 - tau.unsqueeze(-1)) * x0 + tau.unsqueeze(-1) * x1
  tau_min = torch.minimum(t, s)  # (B,), also for a mask that chose no token or every token
  x_min = (1.0 - tau_min[:, None, None]) * x0 + tau_min[:, None, None] * x1
  if math == "equal":  # distinct rows: (t, s) per example, index = mask; teacher one row
    student_rows, student_index = torch.stack([t, s], dim=-1), mask.long()
    teacher_rows, stop = tau_min.unsqueeze(1), shape.teacher_layer
  else:  # public: one row per token, full teacher
    student_rows, student_index = tau, None
    teacher_rows, stop = tau_min.unsqueeze(1).expand_as(tau), None
  hidden, velocity = student(x_tau, student_rows, student_index, labels,
                             tap=shape.student_layer)
  features = student.projector(hidden)
  with torch.no_grad():
    target, _ = teacher(x_min, teacher_rows, None, labels, tap=shape.teacher_layer, stop=stop)
  loss_gen = torch.mean(torch.square(velocity - (x1 - x0)))
  loss_rep = 1.0 - cosine(features, target).mean()
  loss = setting.loss_weight * (loss_gen + setting.gamma * loss_rep)
  return Losses(loss, loss_gen, loss_rep, target)


class ReferenceStep:
  """A fresh student, its EMA teacher and AdamW on a fixed batch; `step()` runs one train step."""

  def __init__(self, setting: torch_reference.Setting, math: str, latents: np.ndarray,
               labels: np.ndarray):
    torch_reference.check_math(math)
    self.setting, self.math = setting, math
    self.student = model_lib.DiT(setting)
    model_lib.dit_init(self.student, torch.Generator().manual_seed(setting.seed))
    self.teacher = copy.deepcopy(self.student).requires_grad_(False)
    self.optimizer = torch.optim.AdamW(
        self.student.parameters(), lr=setting.learning_rate, betas=setting.betas,
        eps=setting.adam_eps, weight_decay=setting.weight_decay)
    self.x0 = patchify(torch.as_tensor(np.asarray(latents, np.float32)), setting.patch_size)
    self.labels = torch.as_tensor(np.asarray(labels, np.int64))
    self.generator = torch.Generator().manual_seed(setting.seed)

  def draw(self) -> Draw:
    """CFG dropout, (t, s, mask) and noise for the batch, from this step's generator."""
    setting, g = self.setting, self.generator
    b, n, c = self.x0.shape
    keep = torch.rand(b, generator=g) >= setting.condition_dropout
    labels = torch.where(keep, self.labels, setting.num_classes)
    t, s = torch.rand(b, generator=g), torch.rand(b, generator=g)
    mask = torch.rand(b, n, generator=g) < setting.mask_ratio
    return Draw(self.x0, torch.randn(b, n, c, generator=g), labels, t, s, mask)

  def update(self, draw: Draw) -> dict[str, float]:
    """Forward, backward, clipping, AdamW and EMA on one draw; returns the losses."""
    setting = self.setting
    self.optimizer.zero_grad(set_to_none=True)
    out = losses(self.student, self.teacher, setting, self.math, draw)
    out.loss.backward()
    params = list(self.student.parameters())
    if setting.grad_clip_norm > 0:
      grads = [p.grad for p in params if p.grad is not None]
      norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
      if norm >= setting.grad_clip_norm:
        for g in grads:
          g.div_(norm).mul_(setting.grad_clip_norm)
    self.optimizer.step()
    with torch.no_grad():
      for ema, p in zip(self.teacher.parameters(), params):
        ema.lerp_(p, 1.0 - setting.ema_decay)
    return {"loss": out.loss.item(), "loss_gen": out.loss_gen.item(),
            "loss_rep": out.loss_rep.item()}

  def step(self) -> dict[str, float]:
    return self.update(self.draw())
