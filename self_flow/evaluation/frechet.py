"""Fréchet distance between Gaussians fitted to two feature sets (the FID formula).

The project measures it in the feature space of its own cached classifier, since Inception
weights are not available offline; the formula is FID's, only the features differ.
"""

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean (F,), covariance (F, F)) of (n, F) features, in float64 for a stable distance."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2 or features.shape[1] < 1:
    raise ValueError(f"features must have shape (n >= 2, F >= 1); got {features.shape}.")
  if not np.all(np.isfinite(features)):
    raise ValueError("features must be finite; got NaN or infinite values.")
  return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray,
                     cov2: np.ndarray) -> float:
  """||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)) between N(mu1, C1) and N(mu2, C2).

  Computed through the similar symmetric matrix C1^(1/2) C2 C1^(1/2), whose eigenvalues are
  those of C1 C2: symmetric eigendecompositions are stable, stay real, and need no retry with
  an offset when the covariances are singular (as with more features than samples), where a
  general matrix square root of C1 C2 may fail or turn complex.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
  dim = mu1.shape[0] if mu1.ndim == 1 else None
  if (dim is None or mu2.shape != (dim,) or cov1.shape != (dim, dim)
      or cov2.shape != (dim, dim)):
    raise ValueError(f"expected mu1, mu2 of one shape (F,) and cov1, cov2 of shape (F, F); got "
                     f"mu1 {mu1.shape}, cov1 {cov1.shape}, mu2 {mu2.shape}, cov2 {cov2.shape}.")
  for name, value in (("mu1", mu1), ("cov1", cov1), ("mu2", mu2), ("cov2", cov2)):
    if not np.all(np.isfinite(value)):
      raise ValueError(f"{name} must be finite; got NaN or infinite values.")
  sqrt_cov1 = _psd_sqrt(cov1)
  middle = sqrt_cov1 @ ((cov2 + cov2.T) / 2) @ sqrt_cov1
  eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
  # Round-off makes zero eigenvalues of a PSD matrix slightly negative; they are zero.
  trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a covariance matrix (negative round-off eigenvalues -> 0)."""
  eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
  return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T
