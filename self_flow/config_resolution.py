"""What a config resolves to, computed once per run: the modality specs and the model's sizes.

Several keys only mean something together (a size preset and its overrides, the image size and
the patch, the mixture probabilities of the trained modalities). `resolve` combines them once;
`config_validation.validate` returns its result, and the trainer hands that one object to the
model factory, the step, the FLOP count, the data and the evaluators, so no consumer re-derives
a fact from raw keys and none can derive it differently.
"""

import dataclasses

import ml_collections

from self_flow.modalities import spec as spec_lib
from self_flow.models import presets


@dataclasses.dataclass(frozen=True)
class ResolvedConfig:
  """The derived facts of one config."""

  specs: dict[str, spec_lib.ModalitySpec]  # config.modalities, in order.
  dims: presets.ModelDims  # Width, depth and heads after the size preset.
  student_layer: int  # 1-based block whose output feeds the projector.
  teacher_layer: int  # 1-based block whose output is the representation target.

  @property
  def first_spec(self) -> spec_lib.ModalitySpec:
    """The spec of the first trained modality (the only one of a single-modality run)."""
    return next(iter(self.specs.values()))

  def spec(self, modality: str) -> spec_lib.ModalitySpec:
    """The spec of `modality`; raises ValueError if the config does not train it."""
    if modality not in self.specs:
      raise ValueError(f"modality={modality!r} is not trained by this config; modalities="
                       f"{tuple(self.specs)}.")
    return self.specs[modality]


def resolve(config: ml_collections.ConfigDict) -> ResolvedConfig:
  """Raises ValueError naming the key when the keys do not combine (sizes, layers, patches)."""
  m = config.model
  dims = presets.resolve_dims(m.preset, m.hidden_size, m.depth, m.num_heads)
  student, teacher = presets.feature_layers(dims.depth, m.student_layer, m.teacher_layer)
  return ResolvedConfig(spec_lib.modality_specs(config), dims, student, teacher)
