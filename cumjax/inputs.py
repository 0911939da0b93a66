"""Checks on the Gaussian input N(mean, cov), shared by the estimators and the sampler."""
from __future__ import annotations

import numpy as np


def validate_gaussian_input(mean, cov, d_in: int | None = None) -> None:
    """Raise ValueError unless ``mean (d,)`` and ``cov (d, d)`` describe a Gaussian (with ``d ==
    d_in`` if given): finite, symmetric and positive semi-definite. Concrete arrays only.

    Tolerances scale with the largest entry of ``cov`` and its dtype's precision (a float32
    covariance built as ``A @ A.T`` is symmetric and PSD only up to float32 rounding): asymmetry up
    to ``max(1e-10, 10 eps)``, eigenvalues down to ``-max(1e-8, 100 eps)`` times that scale."""
    eps = float(np.finfo(np.result_type(np.asarray(cov).dtype, np.float32)).eps)
    mean, cov = np.asarray(mean, np.float64), np.asarray(cov, np.float64)
    d = mean.shape[0] if mean.ndim == 1 else None
    if mean.ndim != 1 or (d_in is not None and d != d_in):
        raise ValueError(f"input mean must have shape ({d_in or 'd'},), got {mean.shape}")
    if cov.shape != (d, d):
        raise ValueError(f"input covariance must have shape ({d}, {d}), got {cov.shape}")
    if not np.all(np.isfinite(mean)):
        raise ValueError("input mean contains NaN or Inf (not finite)")
    if not np.all(np.isfinite(cov)):
        raise ValueError("input covariance contains NaN or Inf (not finite)")
    scale = max(float(np.abs(cov).max()), 1e-300)
    if np.abs(cov - cov.T).max() > max(1e-10, 10 * eps) * scale:
        raise ValueError("input covariance is not symmetric")
    low = float(np.linalg.eigvalsh(cov)[0])
    if low < -max(1e-8, 100 * eps) * scale:
        raise ValueError(f"input covariance is not positive semi-definite (smallest eigenvalue {low:.3e})")
