"""The Gaussian input distribution N(mean, cov), shared by the estimators and the samplers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class Gaussian:
    """The input distribution ``N(mean (d,), cov (d, d))``: a pytree of two arrays, so it can be
    traced, differentiated (``jax.grad`` w.r.t. the input moments) and vmapped like params."""

    mean: Array
    cov: Array

    @classmethod
    def standard(cls, dim: int, dtype=None) -> Gaussian:
        """``N(0, I)`` in ``dim`` dimensions (dtype: jax's default float)."""
        dtype = dtype or jnp.result_type(float)
        return cls(jnp.zeros(dim, dtype), jnp.eye(dim, dtype=dtype))

    @property
    def dim(self) -> int:
        return int(np.shape(self.mean)[-1])

    @property
    def dtype(self):
        return jnp.result_type(self.mean)

    def astype(self, dtype) -> Gaussian:
        return Gaussian(jnp.asarray(self.mean, dtype), jnp.asarray(self.cov, dtype))


def check_gaussian(gaussian, dim: int | None = None) -> Gaussian:
    """``gaussian`` checked: a :class:`Gaussian` of shapes ``(dim,)`` and ``(dim, dim)`` in
    float32 or float64 and, for concrete (not traced) arrays, finite, symmetric and positive
    semi-definite. Raises TypeError/ValueError naming the argument."""
    if not isinstance(gaussian, Gaussian):
        raise TypeError(f"the input distribution must be a cumjax.Gaussian(mean, cov), got {type(gaussian).__name__}")
    mean, cov = gaussian.mean, gaussian.cov
    for name, x in (("mean", mean), ("cov", cov)):
        dtype = np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"input {name} has dtype {dtype}; cumjax computes in float32 or float64")
    d = np.shape(mean)[0] if np.ndim(mean) == 1 else None
    if np.ndim(mean) != 1 or (dim is not None and d != dim):
        raise ValueError(f"input mean must have shape ({dim if dim is not None else 'd'},), got {np.shape(mean)}")
    if np.shape(cov) != (d, d):
        raise ValueError(f"input cov must have shape ({d}, {d}), got {np.shape(cov)}")
    if is_concrete(mean) and is_concrete(cov):
        validate_gaussian_values(mean, cov)
    return gaussian


def is_concrete(x) -> bool:
    """Can ``x``'s values be read now? (Not a tracer of jit/vmap/grad, nor an abstract
    ``jax.ShapeDtypeStruct``.)"""
    return isinstance(x, (np.ndarray, np.generic, jax.Array, float, int, list, tuple)) and not isinstance(
        x, jax.core.Tracer
    )


def validate_gaussian_values(mean, cov) -> None:
    """Raise ValueError unless concrete ``mean (d,)`` and ``cov (d, d)`` are finite and ``cov`` is
    symmetric and positive semi-definite. Numpy only: never compiles, never traces.

    Tolerances scale with the largest entry of ``cov`` and its dtype's precision (a float32
    covariance built as ``A @ A.T`` is symmetric and PSD only up to float32 rounding): asymmetry up
    to ``max(1e-10, 10 eps)``, eigenvalues down to ``-max(1e-8, 100 eps)`` times that scale."""
    eps = float(np.finfo(np.result_type(np.asarray(cov).dtype, np.float32)).eps)
    mean, cov = np.asarray(mean, np.float64), np.asarray(cov, np.float64)
    if not np.all(np.isfinite(mean)):
        raise ValueError("input mean contains NaN or Inf (not finite)")
    if not np.all(np.isfinite(cov)):
        raise ValueError("input cov contains NaN or Inf (not finite)")
    scale = max(float(np.abs(cov).max()), 1e-300)
    if np.abs(cov - cov.T).max() > max(1e-10, 10 * eps) * scale:
        raise ValueError("input cov is not symmetric")
    off = cov - np.diag(np.diag(cov))
    low = float(np.diag(cov).min()) if not off.any() else float(np.linalg.eigvalsh(cov)[0])  # diagonal: no eigensolve
    if low < -max(1e-8, 100 * eps) * scale:
        raise ValueError(f"input cov is not positive semi-definite (smallest eigenvalue {low:.3e})")
