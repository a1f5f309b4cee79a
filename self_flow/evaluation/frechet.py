"""Fréchet distance between Gaussians fitted to two feature sets (the FID formula).

Used with features of the project's own cached classifier, since Inception weights are not
available offline; the formula is the same as FID's, only the feature space differs.
"""

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance (float64) of (n, F) features."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"features must be (n >= 2, F); got shape {features.shape}.")
  return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
  """||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)), computed stably.

  Uses the symmetric form Tr((C1^(1/2) C2 C1^(1/2))^(1/2)) = Tr((C1 C2)^(1/2)), whose matrix is
  symmetric PSD, so eigenvalues replace a general (and sometimes complex) matrix square root.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
  if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
    raise ValueError(f"statistics do not match: mu1 {mu1.shape}, cov1 {cov1.shape}, "
                     f"mu2 {mu2.shape}, cov2 {cov2.shape}.")
  sqrt_cov1 = _psd_sqrt(cov1)
  middle = sqrt_cov1 @ cov2 @ sqrt_cov1
  eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
  trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Square root of a symmetric PSD matrix via eigh (exact for singular covariances too)."""
  eigenvalues, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
  return (vectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ vectors.T
