"""Closeness of two floating-point computations of the same math, scaled to what they compute.

Two evaluations of one formula in another order (a gather instead of a per-token table, a scan
instead of unrolled blocks, another XLA release's fusion) round differently, and the difference
grows with the magnitudes summed, not with each output element. An absolute tolerance does not
scale with the tensor, and a per-element relative one fails on entries that cancel to near zero
(issue 28: -0.00325 against -0.00326 in a tensor reaching 7.7, after an XLA update). So the error
here is max|actual - expected| / max(|actual|, |expected|), per tensor (per leaf of a tree), and
its bound is stated from the computation: `rounding_bound(terms)` = terms x the dtype's machine
epsilon, the worst-case relative error of a chain of `terms` roundings (Higham, Accuracy and
Stability of Numerical Algorithms, 2nd ed., Section 4.2: a sum of n terms is off by at most
(n - 1) u times the sum of magnitudes).

A bound that scales is looser on the largest entries than a fixed rtol, so each such test also
shows its power: `assert_fault_detected` checks that a real error (a shifted gather index, two
swapped layers, a dropped mask) moves the result by at least `FAULT_FACTOR` times the bound.
"""

import jax
import numpy as np

FAULT_FACTOR = 100.0  # how far above the bound a deliberate fault must land


def rounding_bound(terms: int, dtype=np.float32) -> float:
  """Relative error bound of a chain of `terms` roundings in `dtype`: terms x eps(dtype)."""
  return float(terms * np.finfo(dtype).eps)


def _leaf_errors(actual, expected):
  """[(key path, scaled error, worst index, actual there, expected there)] per leaf pair."""
  pairs = jax.tree_util.tree_flatten_with_path(expected)[0]
  actual_leaves = jax.tree.leaves(actual)
  if len(actual_leaves) != len(pairs):
    raise AssertionError(f"{len(actual_leaves)} arrays compared with {len(pairs)}")
  rows = []
  for (path, e), a in zip(pairs, actual_leaves):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    if a.shape != e.shape:
      raise AssertionError(f"{jax.tree_util.keystr(path)}: shape {a.shape} vs {e.shape}")
    if a.size == 0:
      continue
    difference = np.abs(a - e)
    scale = max(np.abs(a).max(), np.abs(e).max())
    worst = np.unravel_index(np.argmax(difference), difference.shape)
    error = 0.0 if scale == 0 else float(difference[worst] / scale)
    rows.append((jax.tree_util.keystr(path), error, worst, a[worst], e[worst]))
  return rows


def scaled_error(actual, expected) -> float:
  """The largest max|actual - expected| / max(|actual|, |expected|) over the leaves."""
  return max((row[1] for row in _leaf_errors(actual, expected)), default=0.0)


def assert_equivalent(actual, expected, *, bound: float, what: str = "") -> None:
  """Every leaf's scaled error is within `bound`; the message names the worst element."""
  for path, error, index, a, e in _leaf_errors(actual, expected):
    if not error <= bound:
      raise AssertionError(
          f"{what}{path}: scaled error {error:.3g} exceeds the bound {bound:.3g} (worst at "
          f"{tuple(int(i) for i in index)}: {a!r} vs {e!r})")


def assert_fault_detected(faulty, expected, *, bound: float, fault: str) -> float:
  """The control of an equivalence test: `faulty` (the computation with a deliberate error)
  differs from `expected` by at least FAULT_FACTOR x `bound`. Returns its scaled error."""
  error = scaled_error(faulty, expected)
  assert error >= FAULT_FACTOR * bound, (
      f"{fault} moves the result by only {error:.3g} of its scale, under {FAULT_FACTOR:g}x the "
      f"bound {bound:.3g}: the equivalence check could not tell this fault from rounding")
  return error
