"""The FID InceptionV3 (TF "2015-12-05" graph) in Flax nnx, with weights from a local file.

This is the network of the ADM evaluator (guided-diffusion `evaluations/evaluator.py`, which runs
`classify_image_graph_def.pb`), of TTUR's FID and of pytorch-fid's `FIDInceptionA/C/E` port. It
differs from torchvision's InceptionV3 in three places, all kept here: the average-pool branches
of the A, C and first E blocks ignore the zero padding (count_include_pad=False, as TF does), and
the LAST E block (Mixed_7c, TF `mixed_10`) max-pools its pool branch. Outputs, per image:

  pool     (2048,)  pool_3: the global average of Mixed_7c; FID and precision/recall features.
  spatial  (h*w*7,) the first 7 channels of `mixed_6/conv` (Mixed_6d's 1x1 branch after BN and
           ReLU), flattened in (row, column, channel) order as the ADM evaluator does: sFID
           features, 17*17*7 = 2023 dims at the 299x299 input.
  logits   (1008,)  pool @ softmax/weights WITHOUT the bias: the ADM evaluator (like improved-GAN's
           Inception Score code) takes the graph's `softmax/logits/MatMul` before its bias add,
           so the bias in a weights file is accepted and not used.

Preprocessing (`preprocess`): uint8 images -> bilinear resize to 299x299 -> [-1, 1). "adm" is the
TF graph's own: TF1 `ResizeBilinear` (align_corners=False without half-pixel centres) on [0, 255]
values, then (x - 128) / 128. "pytorch_fid" is F.interpolate(align_corners=False) and 2 x - 1 on
[0, 1] values. Convolutions run at float32 "highest" precision (no bf16 / TF32 passes).

Weights: no download; `load_params(path)` reads a user-supplied file, by either naming:
  * TF graph names (what dumping the Const nodes of ADM's classify_image_graph_def.pb gives):
    "<scope>/conv2d_params" (kernel, HWIO), "<scope>/batchnorm/{gamma,beta,moving_mean,
    moving_variance}", "softmax/weights" (2048, 1008), optional "softmax/biases"; e.g. scope
    "mixed_6/conv" is Mixed_6d.branch1x1. This is the documented .npz layout.
  * pytorch-fid names (pt_inception-2015-12-05-6726825d.pth): "<Module>.<branch>.conv.weight"
    (OIHW), ".bn.{weight,bias,running_mean,running_var}" (".bn.num_batches_tracked" ignored),
    "fc.weight" (1008, 2048), optional "fc.bias".
A .npz is read with numpy; .pt/.pth/.bin/.safetensors through `self_flow.weight_files`.

The file is long (about 500 lines) because it is one network: the blocks, both weight namings
and the two preprocessings must agree exactly with one graph, and reading them side by side is
how that is checked; split, one graph's definition would be scattered over several files.

CAVEAT: numbers are comparable to published ADM FIDs only with the TF graph's weights and the
"adm" preprocessing at 299x299; other weights, resizes or input sizes give other numbers. With
random weights (`random_params`) this module is for testing only.
"""

import functools
import hashlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from self_flow import weight_files

INPUT_SIZE = 299  # The TF graph's input side; any other is for tests only.
MIN_INPUT_SIZE = 75  # Smallest side the stride-2 valid convolutions and pools leave >= 1x1.
POOL_DIM = 2048
NUM_LOGITS = 1008  # The 2015 graph's 1008-way softmax (1000 classes + 8 unused).
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7] for sFID.
BATCH_NORM_EPSILON = 1e-3  # The TF graph's variance_epsilon (torchvision BasicConv2d: eps=0.001).
PREPROCESSING = ("adm", "pytorch_fid")
NAMINGS = ("tf", "torch")

_HIGHEST = jax.lax.Precision.HIGHEST


class ConvBN(nnx.Module):
  """Bias-free convolution, inference batch norm, ReLU: one TF graph conv scope / BasicConv2d.

  Built with placeholder values: the weights come from a file (`load_params`) or, for tests,
  `random_params`, through `create_model`."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size, *, stride: int = 1,
               padding=(0, 0)):
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    self.stride = stride
    self.padding = ((padding[0], padding[0]), (padding[1], padding[1]))
    self.kernel = nnx.Param(jnp.zeros((kh, kw, in_channels, out_channels)))
    self.scale = nnx.Param(jnp.ones((out_channels,)))
    self.bias = nnx.Param(jnp.zeros((out_channels,)))
    self.mean = nnx.BatchStat(jnp.zeros((out_channels,)))
    self.var = nnx.BatchStat(jnp.ones((out_channels,)))

  def __call__(self, x):
    y = jax.lax.conv_general_dilated(
        x, self.kernel[...], (self.stride, self.stride), self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_HIGHEST)
    multiplier = self.scale[...] * jax.lax.rsqrt(self.var[...] + BATCH_NORM_EPSILON)
    return jax.nn.relu(y * multiplier + (self.bias[...] - self.mean[...] * multiplier))


def max_pool(x, stride: int, padding: int = 0):
  """3x3 max pool; padded cells never win (they hold -inf)."""
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                               pad)


def avg_pool_excluding_padding(x):
  """3x3, stride 1, padding 1 average over the cells inside the image only, as TF's avg_pool
  (and pytorch-fid's count_include_pad=False): border outputs divide by 4 or 6, not 9."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
  count = jax.lax.reduce_window(jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype), 0.0, jax.lax.add,
                                window, strides, pad)
  return total / count


class InceptionA(nnx.Module):
  """35x35 block (Mixed_5b-d): 1x1, 5x5, double 3x3 and avg-pool branches."""

  TF_SCOPES = {"branch1x1": "conv", "branch5x5_1": "tower/conv", "branch5x5_2": "tower/conv_1",
               "branch3x3dbl_1": "tower_1/conv", "branch3x3dbl_2": "tower_1/conv_1",
               "branch3x3dbl_3": "tower_1/conv_2", "branch_pool": "tower_2/conv"}

  def __init__(self, in_channels: int, pool_features: int):
    self.branch1x1 = ConvBN(in_channels, 64, 1)
    self.branch5x5_1 = ConvBN(in_channels, 48, 1)
    self.branch5x5_2 = ConvBN(48, 64, 5, padding=(2, 2))
    self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
    self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=(1, 1))
    self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=(1, 1))
    self.branch_pool = ConvBN(in_channels, pool_features, 1)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(avg_pool_excluding_padding(x)),
    ], axis=-1)


class InceptionB(nnx.Module):
  """35x35 -> 17x17 reduction (Mixed_6a): strided 3x3, strided double 3x3, max pool."""

  TF_SCOPES = {"branch3x3": "conv", "branch3x3dbl_1": "tower/conv",
               "branch3x3dbl_2": "tower/conv_1", "branch3x3dbl_3": "tower/conv_2"}

  def __init__(self, in_channels: int):
    self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
    self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
    self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=(1, 1))
    self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch3x3(x),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        max_pool(x, stride=2),
    ], axis=-1)


class InceptionC(nnx.Module):
  """17x17 block (Mixed_6b-e): 1x1, factorised 7x7, double factorised 7x7, avg-pool branches."""

  TF_SCOPES = {"branch1x1": "conv", "branch7x7_1": "tower/conv", "branch7x7_2": "tower/conv_1",
               "branch7x7_3": "tower/conv_2", "branch7x7dbl_1": "tower_1/conv",
               "branch7x7dbl_2": "tower_1/conv_1", "branch7x7dbl_3": "tower_1/conv_2",
               "branch7x7dbl_4": "tower_1/conv_3", "branch7x7dbl_5": "tower_1/conv_4",
               "branch_pool": "tower_2/conv"}

  def __init__(self, in_channels: int, channels_7x7: int):
    c7 = channels_7x7
    self.branch1x1 = ConvBN(in_channels, 192, 1)
    self.branch7x7_1 = ConvBN(in_channels, c7, 1)
    self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
    self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = ConvBN(in_channels, 192, 1)

  def __call__(self, x):
    double = self.branch7x7dbl_1(x)
    for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                 self.branch7x7dbl_5):
      double = conv(double)
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
        double,
        self.branch_pool(avg_pool_excluding_padding(x)),
    ], axis=-1)


class InceptionD(nnx.Module):
  """17x17 -> 8x8 reduction (Mixed_7a): strided 3x3, factorised 7x7 then strided 3x3, max pool."""

  TF_SCOPES = {"branch3x3_1": "tower/conv", "branch3x3_2": "tower/conv_1",
               "branch7x7x3_1": "tower_1/conv", "branch7x7x3_2": "tower_1/conv_1",
               "branch7x7x3_3": "tower_1/conv_2", "branch7x7x3_4": "tower_1/conv_3"}

  def __init__(self, in_channels: int):
    self.branch3x3_1 = ConvBN(in_channels, 192, 1)
    self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
    self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
    self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

  def __call__(self, x):
    tower = self.branch7x7x3_1(x)
    for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      tower = conv(tower)
    return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), tower, max_pool(x, stride=2)],
                           axis=-1)


class InceptionE(nnx.Module):
  """8x8 block (Mixed_7b, 7c) with split 1x3 / 3x1 branches.

  `pool` is "avg" for Mixed_7b and "max" for Mixed_7c: the FID graph max-pools in its last block
  (pytorch-fid's FIDInceptionE_2), unlike the paper and torchvision."""

  TF_SCOPES = {"branch1x1": "conv", "branch3x3_1": "tower/conv",
               "branch3x3_2a": "tower/mixed/conv", "branch3x3_2b": "tower/mixed/conv_1",
               "branch3x3dbl_1": "tower_1/conv", "branch3x3dbl_2": "tower_1/conv_1",
               "branch3x3dbl_3a": "tower_1/mixed/conv", "branch3x3dbl_3b": "tower_1/mixed/conv_1",
               "branch_pool": "tower_2/conv"}

  def __init__(self, in_channels: int, pool: str):
    if pool not in ("avg", "max"):
      raise ValueError(f"pool={pool!r}; allowed: 'avg', 'max'.")
    self.pool = pool
    self.branch1x1 = ConvBN(in_channels, 320, 1)
    self.branch3x3_1 = ConvBN(in_channels, 384, 1)
    self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
    self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=(1, 1))
    self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = ConvBN(in_channels, 192, 1)

  def __call__(self, x):
    single = self.branch3x3_1(x)
    double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = (max_pool(x, stride=1, padding=1) if self.pool == "max"
              else avg_pool_excluding_padding(x))
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch3x3_2a(single), self.branch3x3_2b(single),
        self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
        self.branch_pool(pooled),
    ], axis=-1)


# Module attribute -> TF graph scope, in forward order.
_TF_TOP_SCOPES = {
    "Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
    "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4", "Mixed_5b": "mixed",
    "Mixed_5c": "mixed_1", "Mixed_5d": "mixed_2", "Mixed_6a": "mixed_3", "Mixed_6b": "mixed_4",
    "Mixed_6c": "mixed_5", "Mixed_6d": "mixed_6", "Mixed_6e": "mixed_7", "Mixed_7a": "mixed_8",
    "Mixed_7b": "mixed_9", "Mixed_7c": "mixed_10",
}


class InceptionV3(nnx.Module):
  """The FID InceptionV3 on NHWC float inputs already preprocessed to [-1, 1] (see `preprocess`).

  Returns {"pool": (B, 2048), "spatial": (B, h*w*7), "logits": (B, 1008)}; the network is fully
  convolutional, so any input side >= 75 runs (h = w = 17 at 299)."""

  def __init__(self):
    self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
    self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=(1, 1))
    self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
    self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
    self.Mixed_5b = InceptionA(192, pool_features=32)
    self.Mixed_5c = InceptionA(256, pool_features=64)
    self.Mixed_5d = InceptionA(288, pool_features=64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = InceptionC(768, channels_7x7=128)
    self.Mixed_6c = InceptionC(768, channels_7x7=160)
    self.Mixed_6d = InceptionC(768, channels_7x7=160)
    self.Mixed_6e = InceptionC(768, channels_7x7=192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = InceptionE(1280, pool="avg")
    self.Mixed_7c = InceptionE(2048, pool="max")
    self.fc = nnx.Param(jnp.zeros((POOL_DIM, NUM_LOGITS)))

  def __call__(self, x) -> dict[str, jax.Array]:
    if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < MIN_INPUT_SIZE:
      raise ValueError(f"InceptionV3 takes (B, H, W, 3) inputs with H, W >= {MIN_INPUT_SIZE}; "
                       f"got {x.shape}.")
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = max_pool(x, stride=2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = max_pool(x, stride=2)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c):
      x = block(x)
    # TF `mixed_6/conv`: Mixed_6d's 1x1 branch (XLA shares it with the block's own call).
    spatial = self.Mixed_6d.branch1x1(x)[..., :SPATIAL_CHANNELS]
    for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
      x = block(x)
    pool = jnp.mean(x, axis=(1, 2))
    return {"pool": pool, "spatial": spatial.reshape(spatial.shape[0], -1),
            "logits": jnp.dot(pool, self.fc[...], precision=_HIGHEST)}


# --- Preprocessing: uint8 images at any size -> the network's [-1, 1] input. ---


def resize_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
  """(out_size, in_size) bilinear interpolation weights along one axis.

  "adm": TF1 ResizeBilinear(align_corners=False), the graph's op: source = out * in/out.
  "pytorch_fid": F.interpolate(mode="bilinear", align_corners=False): half-pixel centres,
  source = (out + 0.5) * in/out - 0.5, clamped at 0. Neither antialiases when downsampling."""
  if mode not in PREPROCESSING:
    raise ValueError(f"preprocessing={mode!r}; allowed: {PREPROCESSING}.")
  scale = in_size / out_size
  out = np.arange(out_size, dtype=np.float64)
  source = out * scale if mode == "adm" else np.maximum((out + 0.5) * scale - 0.5, 0.0)
  low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
  high = np.minimum(low + 1, in_size - 1)
  frac = source - low
  matrix = np.zeros((out_size, in_size), np.float64)
  np.add.at(matrix, (np.arange(out_size), low), 1.0 - frac)
  np.add.at(matrix, (np.arange(out_size), high), frac)
  return matrix.astype(np.float32)


def preprocess(images, size: int = INPUT_SIZE, mode: str = "adm"):
  """uint8 (B, H, W, 3) -> float32 (B, size, size, 3) in [-1, 1] as the chosen reference does."""
  x = images.astype(jnp.float32)
  rows = jnp.asarray(resize_matrix(x.shape[1], size, mode))
  cols = jnp.asarray(resize_matrix(x.shape[2], size, mode))
  x = jnp.einsum("oh,bhwc->bowc", rows, x, precision=_HIGHEST)
  x = jnp.einsum("pw,bowc->bopc", cols, x, precision=_HIGHEST)
  if mode == "adm":
    return (x - 128.0) / 128.0
  return x / 127.5 - 1.0


# --- Weights: the documented names <-> the module's parameters. ---

# TF batchnorm constant -> ConvBN variable; torch BatchNorm2d buffer -> ConvBN variable.
_TF_BATCHNORM = {"gamma": "scale", "beta": "bias", "moving_mean": "mean",
                 "moving_variance": "var"}
_TORCH_BATCHNORM = {"weight": "scale", "bias": "bias", "running_mean": "mean",
                    "running_var": "var"}
# Entries a weights file may hold that the evaluator does not use (see the module docstring).
_UNUSED = {"tf": ("softmax/biases",), "torch": ("fc.bias",)}
_UNUSED_TORCH_SUFFIX = ".bn.num_batches_tracked"


def _conv_layers(model: InceptionV3) -> list[tuple[str, str, tuple[str, ...]]]:
  """(module path "Mixed_6d.branch1x1", TF scope "mixed_6/conv", attribute path) per ConvBN."""
  layers = []
  for attribute, scope in _TF_TOP_SCOPES.items():
    module = getattr(model, attribute)
    if isinstance(module, ConvBN):
      layers.append((attribute, scope, (attribute,)))
    else:
      layers.extend((f"{attribute}.{branch}", f"{scope}/{sub}", (attribute, branch))
                    for branch, sub in type(module).TF_SCOPES.items())
  return layers


@functools.cache
def _name_table(naming: str) -> dict[str, tuple[tuple[str, ...], bool]]:
  """{file name: (parameter path in the pure state dict, transpose?)} for one naming."""
  abstract = nnx.eval_shape(lambda: InceptionV3())
  table = {}
  for module_path, scope, attributes in _conv_layers(abstract):
    if naming == "tf":
      table[f"{scope}/conv2d_params"] = (attributes + ("kernel",), False)
      table.update({f"{scope}/batchnorm/{name}": (attributes + (variable,), False)
                    for name, variable in _TF_BATCHNORM.items()})
    else:
      table[f"{module_path}.conv.weight"] = (attributes + ("kernel",), True)
      table.update({f"{module_path}.bn.{name}": (attributes + (variable,), False)
                    for name, variable in _TORCH_BATCHNORM.items()})
  table["softmax/weights" if naming == "tf" else "fc.weight"] = (("fc",), naming == "torch")
  return table


# Module layout -> torch file layout: HWIO kernels -> OIHW, the (in, out) fc kernel -> (out, in).
_TORCH_AXES = {4: (3, 2, 0, 1), 2: (1, 0)}


def _file_shape(shape: tuple[int, ...], transpose: bool) -> tuple[int, ...]:
  return tuple(shape[i] for i in _TORCH_AXES[len(shape)]) if transpose else tuple(shape)


def _to_file_layout(array: np.ndarray, transpose: bool) -> np.ndarray:
  return array.transpose(_TORCH_AXES[array.ndim]) if transpose else array


def _from_file_layout(array: np.ndarray, transpose: bool) -> np.ndarray:
  return array.transpose(np.argsort(_TORCH_AXES[array.ndim])) if transpose else array


def _abstract_state() -> dict:
  return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: InceptionV3())))


def _get(tree: dict, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def _put(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def detect_naming(names) -> str:
  """"tf" or "torch" from the names in a weights file; a clear error for anything else."""
  names = list(names)
  if any(n.endswith("/conv2d_params") or n.startswith("softmax/") for n in names):
    return "tf"
  if any(n.endswith(".conv.weight") or n.startswith("fc.") for n in names):
    return "torch"
  raise ValueError(f"these weights name no FID InceptionV3 layer in a known naming; first names: "
                   f"{sorted(names)[:5]}. Expected TF graph names ('mixed_6/conv/conv2d_params', "
                   "'softmax/weights', ...) or pytorch-fid names ('Mixed_6d.branch1x1.conv."
                   "weight', 'fc.weight', ...).")


def params_from_named_arrays(arrays: Mapping[str, np.ndarray], source: str = "the weights"
                             ) -> dict:
  """The module's pure state dict from a {name: array} dict in either documented naming.

  Raises one ValueError naming every missing, unexpected and wrongly shaped entry of `source`."""
  naming = detect_naming(arrays)
  table = _name_table(naming)
  abstract = _abstract_state()
  ignored = set(_UNUSED[naming])
  unexpected = sorted(n for n in arrays if n not in table and n not in ignored
                      and not (naming == "torch" and n.endswith(_UNUSED_TORCH_SUFFIX)))
  missing = sorted(n for n in table if n not in arrays)
  wrong_shape, params = [], {}
  for name, (path, transpose) in table.items():
    if name not in arrays:
      continue
    want = _file_shape(_get(abstract, path).shape, transpose)
    if np.shape(arrays[name]) != want:
      wrong_shape.append(f"{name}: {np.shape(arrays[name])}, expected {want}")
      continue
    value = _from_file_layout(np.asarray(arrays[name], np.float32), transpose)
    _put(params, path, value)
  if missing or unexpected or wrong_shape:
    parts = [f"{label} ({len(items)}): {items[:8]}{' ...' if len(items) > 8 else ''}"
             for label, items in (("missing", missing), ("unexpected", unexpected),
                                  ("wrong shape", wrong_shape)) if items]
    raise ValueError(f"{source}: the arrays do not fit the FID InceptionV3 in {naming!r} "
                     "naming: " + "; ".join(parts) + ".")
  return params


def to_named_arrays(params: dict, naming: str) -> dict[str, np.ndarray]:
  """The inverse of `params_from_named_arrays`: the module's state as a {name: array} file dict,
  e.g. to convert a .pth once into the documented .npz (np.savez(path, **arrays))."""
  if naming not in NAMINGS:
    raise ValueError(f"naming={naming!r}; allowed: {NAMINGS}.")
  return {name: _to_file_layout(np.asarray(_get(params, path)), transpose)
          for name, (path, transpose) in _name_table(naming).items()}


def read_weights_file(path: str) -> dict[str, np.ndarray]:
  """{name: array} of a .npz, .pt/.pth/.bin or .safetensors file (self_flow.weight_files)."""
  return weight_files.load_state_dict(path)


def load_params(path: str) -> dict:
  """The module's pure state dict from a user-supplied weights file (see the module docstring)."""
  return params_from_named_arrays(read_weights_file(path), source=f"Inception weights {path}")


def random_params(seed: int = 0) -> dict:
  """Random weights of the right shapes (He-normal kernels, perturbed batch norms): tests only."""
  rng = np.random.default_rng(seed)
  params = {}
  for path, leaf in sorted(traverse_util.flatten_dict(_abstract_state()).items()):
    shape, name = leaf.shape, path[-1]
    if name == "kernel" or name == "fc":
      value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # bias, mean
      value = rng.normal(0.0, 0.1, shape)
    _put(params, path, value.astype(np.float32))
  return params


def create_model(params: dict) -> InceptionV3:
  """InceptionV3 holding `params` (from `load_params`, or `random_params` in tests)."""
  graphdef, state = nnx.split(nnx.eval_shape(InceptionV3))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def fingerprint(params: dict) -> str:
  """sha256 of every weight (names, shapes and bytes): identifies the weights in cache files."""
  digest = hashlib.sha256()
  for path, value in sorted(traverse_util.flatten_dict(params).items()):
    value = np.ascontiguousarray(np.asarray(value, np.float32))
    digest.update(repr((path, value.shape)).encode())
    digest.update(value.tobytes())
  return digest.hexdigest()
