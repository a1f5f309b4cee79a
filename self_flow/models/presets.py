"""Size presets of the SiT/DiT family and the Self-Flow feature-layer rule."""

import dataclasses

# name -> (hidden size D, depth, heads), as in SiT/DiT.
SIZE_PRESETS = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}


@dataclasses.dataclass(frozen=True)
class ModelDims:
  """Resolved architecture sizes (after applying a preset and explicit overrides)."""

  hidden_size: int
  depth: int
  num_heads: int


def resolve_dims(preset: str, hidden_size: int = 0, depth: int = 0,
                 num_heads: int = 0) -> ModelDims:
  """Applies a preset; non-zero explicit values win, so `preset="custom"` needs all three."""
  if preset == "custom":
    base = (0, 0, 0)
  elif preset in SIZE_PRESETS:
    base = SIZE_PRESETS[preset]
  else:
    raise ValueError(
        f"model.preset={preset!r} is not a size preset; "
        f"allowed: {sorted(SIZE_PRESETS)} or 'custom'.")
  dims = ModelDims(hidden_size or base[0], depth or base[1], num_heads or base[2])
  for name, value in dataclasses.asdict(dims).items():
    if value <= 0:
      raise ValueError(f"model.{name}={value} must be a positive integer (preset={preset!r}).")
  if dims.hidden_size % dims.num_heads:
    raise ValueError(f"model.hidden_size={dims.hidden_size} must be divisible by "
                     f"model.num_heads={dims.num_heads}.")
  return dims


def feature_layers(depth: int, student_layer: int = 0, teacher_layer: int = 0) -> tuple[int, int]:
  """Student/teacher feature layers: 1-based, after the block; defaults round(0.3 D), round(0.7 D).

  The paper fixes the ratios 0.3/0.7 (8/20 for SiT-XL's 28 blocks); explicit values override.
  """
  student = student_layer or max(1, round(0.3 * depth))
  teacher = teacher_layer or max(1, round(0.7 * depth))
  if not 1 <= student < teacher <= depth:
    raise ValueError(
        f"feature layers must satisfy 1 <= student_layer < teacher_layer <= depth; got "
        f"student_layer={student}, teacher_layer={teacher}, depth={depth}.")
  return student, teacher
