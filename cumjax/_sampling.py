"""Pieces every sampler shares (Monte Carlo, ground truth, tail and gradient sampling): sample-size
checks, the whitened input transform, the accumulation dtype and Chan et al.'s merge."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .gaussian import Gaussian, is_concrete
from .mlp import HIGHEST, MLPSpec, forward

Array = jax.Array
MAX_ROWS = 2**32  # sample indices are uint32


def accumulation_dtype():
    """float64 when jax x64 is enabled (sums of many samples), else float32."""
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def default_chunk_size() -> int:
    """4096 rows on CPU (stays in cache), 65536 on accelerators (amortises per-step overhead)."""
    return 4096 if jax.default_backend() == "cpu" else 65536


def _is_count(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_num_samples(num_samples, name: str = "num_samples", minimum: int = 2) -> int:
    if not _is_count(num_samples) or num_samples < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {num_samples!r}")
    return int(num_samples)


def check_chunk_size(chunk_size, num_samples: int | None = None) -> int:
    """``chunk_size`` (default :func:`default_chunk_size`) checked, at most ``num_samples``."""
    chunk = default_chunk_size() if chunk_size is None else chunk_size
    if not _is_count(chunk) or chunk < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return int(chunk) if num_samples is None else min(int(chunk), int(num_samples))


def is_identity(cov) -> bool:
    """Is a concrete ``cov`` exactly the identity? (False for traced values.)"""
    return is_concrete(cov) and np.array_equal(np.asarray(cov), np.eye(np.shape(cov)[0]))


def input_factor(cov, dtype) -> Array | None:
    """``F`` with ``F F^T = cov`` in ``dtype`` (Cholesky, computed in the default float; a symmetric
    eigen-root when ``cov`` is singular), or None for an identity ``cov`` (saves a d x d matmul per
    sample)."""
    if cov is None or is_identity(cov):
        return None
    cov = jnp.asarray(cov, jnp.result_type(float))  # float64 when x64 is enabled
    chol = jnp.linalg.cholesky(cov)
    vals, vecs = jnp.linalg.eigh(cov)
    root = vecs * jnp.sqrt(jnp.maximum(vals, 0.0))
    return jnp.where(jnp.all(jnp.isfinite(chol)), chol, root).astype(dtype)


def whitened(gaussian: Gaussian, dtype) -> tuple[Array, Array | None]:
    """``(mean, F)`` in ``dtype``: inputs are ``x = mean + e @ F.T`` for standard normal ``e``."""
    return jnp.asarray(gaussian.mean, dtype), input_factor(gaussian.cov, dtype)


def to_inputs(e: Array, mean: Array, factor: Array | None) -> Array:
    """``mean + e @ F.T`` for rows ``e (..., d)`` (F None: the identity)."""
    return mean + (e if factor is None else jnp.matmul(e, factor.T, precision=HIGHEST))


def chan_weights(count_a, count_b):
    """``(n, wb)`` for merging disjoint sample sets a and b: ``n = count_a + count_b`` and the
    weight ``wb = count_b / n`` of b's mean (0 when both are empty)."""
    n = count_a + count_b
    return n, jnp.where(n > 0, count_b / jnp.maximum(n, 1), 0.0)


def chan_merge(mean_a, m2_a, mean_b, m2_b, count_a, wb):
    """Chan et al.'s parallel update of a mean and its sum of squared deviations (elementwise):
    ``delta = mean_b - mean_a``, ``mean = mean_a + wb delta``, ``m2 = m2_a + m2_b + delta^2 count_a wb``.
    Never subtracts large running sums, so float32 accumulation loses about one rounding per merge."""
    delta = mean_b - mean_a
    return mean_a + delta * wb, m2_a + m2_b + delta * delta * count_a * wb


# ----------------------------------------------------------------------------- streamed statistics


class Stats(NamedTuple):
    """Running Monte Carlo statistics of every layer (leaves in the accumulation dtype)."""

    count: jax.Array  # () number of samples merged
    mean: dict  # label -> (n,)
    m2: dict  # label -> (n,) sum of squared deviations from the mean
    second: dict | None  # label -> (n, n) mean of x x^T


def merge_stats(a: Stats, b: Stats) -> Stats:
    """Chan et al.'s parallel update: the statistics of the union of two disjoint sample sets."""
    n, wb = chan_weights(a.count, b.count)
    mean, m2 = {}, {}
    for k in a.mean:
        mean[k], m2[k] = chan_merge(a.mean[k], a.m2[k], b.mean[k], b.m2[k], a.count, wb)
    second = None if a.second is None else {k: a.second[k] + (b.second[k] - a.second[k]) * wb for k in a.second}
    return Stats(n, mean, m2, second)


def empty_stats(spec: MLPSpec, second_moments: bool, acc) -> Stats:
    size = {k: spec.dims[int(k[3:]) + 1] for k in spec.labels}  # "pre{l}"/"act{l}" have size dims[l + 1]
    zeros = lambda *shape: jnp.zeros(shape, acc)  # noqa: E731
    second = {k: zeros(n, n) for k, n in size.items()} if second_moments else None
    return Stats(zeros(), {k: zeros(n) for k, n in size.items()}, {k: zeros(n) for k, n in size.items()}, second)


def chunk_stats(key, params, spec, mean, factor, rows, valid, second_moments, acc) -> Stats:
    """Statistics of the samples ``rows (c,)`` where ``valid (c,)``."""
    d = mean.shape[0]
    z = jax.vmap(lambda r: jax.random.normal(jax.random.fold_in(key, r), (d,), mean.dtype))(rows)
    x = to_inputs(z, mean, factor)
    w = valid.astype(mean.dtype)[:, None]
    count = jnp.sum(w)
    inv = 1 / jnp.maximum(count, 1)
    stats = Stats(count.astype(acc), {}, {}, {} if second_moments else None)
    for k, y in forward(params, spec, x, all_layers=True).items():
        mu = jnp.sum(w * y, axis=0) * inv
        dev = (y - mu) * w
        stats.mean[k], stats.m2[k] = mu.astype(acc), jnp.sum(dev * dev, axis=0).astype(acc)
        if second_moments:
            stats.second[k] = (jnp.matmul((w * y).T, y, precision=HIGHEST) * inv).astype(acc)
    return stats


def stream(key, params, spec, mean, factor, first, stop, num_chunks, chunk, second_moments) -> Stats:
    """Statistics of samples ``first <= i < stop``, in ``num_chunks`` chunks of ``chunk`` rows."""
    acc = accumulation_dtype()
    offsets = jnp.arange(chunk, dtype=jnp.uint32)

    def body(carry, c):
        rows = first + c * jnp.uint32(chunk) + offsets
        return merge_stats(
            carry, chunk_stats(key, params, spec, mean, factor, rows, rows < stop, second_moments, acc)
        ), None

    out, _ = jax.lax.scan(body, empty_stats(spec, second_moments, acc), jnp.arange(num_chunks, dtype=jnp.uint32))
    return out
