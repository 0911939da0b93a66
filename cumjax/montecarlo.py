"""Monte Carlo on the same parameters: the baseline and the ground truth.

Inputs ``x ~ N(mean, cov)`` are drawn in fixed-size chunks (memory independent of the number of
samples); chunk ``c`` uses ``fold_in(key, c)``, so a result depends only on (key, params, N, chunk
size), not on how chunks are spread over devices. Each chunk's sample mean and sum of squared
deviations are merged with Chan et al.'s parallel update, in float64 when x64 is enabled (float32
otherwise, where the pairwise merge keeps the error near one rounding per chunk).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .inputs import validate_gaussian_input
from .mlp import MLPSpec, forward, layer_weights


class MCResult(NamedTuple):
    """Per label: sample ``mean`` (n,), its standard error ``sem`` (n,), optionally the second
    moment matrix ``second`` E[x x^T] (n, n); ``num_samples`` drawn."""

    mean: dict
    sem: dict
    second: dict | None
    num_samples: int


class _Stats(NamedTuple):
    count: jax.Array  # ()
    mean: dict
    m2: dict  # sum of squared deviations from the mean
    second: dict | None  # running mean of x x^T


def forward_flops(spec: MLPSpec) -> int:
    """FLOPs of one forward pass: ``2 in out`` per linear layer, plus ``out`` for its bias and
    ``out`` for its activation (hidden layers)."""
    total = 0
    for l, (a, b) in enumerate(zip(spec.dims[:-1], spec.dims[1:])):
        total += 2 * a * b + (b if spec.use_bias else 0) + (b if l < spec.num_layers - 1 else 0)
    return total


def _input_factor(cov):
    """A square root ``F`` with ``F F^T = cov`` (Cholesky; symmetric eigen-root if singular)."""
    chol = jnp.linalg.cholesky(cov)
    vals, vecs = jnp.linalg.eigh(cov)
    root = vecs * jnp.sqrt(jnp.maximum(vals, 0.0))
    return jnp.where(jnp.all(jnp.isfinite(chol)), chol, root)


def _merge(a: _Stats, b: _Stats) -> _Stats:
    n = a.count + b.count
    wb = jnp.where(n > 0, b.count / jnp.maximum(n, 1), 0.0)
    mean, m2 = {}, {}
    for k in a.mean:
        delta = b.mean[k] - a.mean[k]
        mean[k] = a.mean[k] + delta * wb
        m2[k] = a.m2[k] + b.m2[k] + delta * delta * a.count * wb
    second = None if a.second is None else {k: a.second[k] + (b.second[k] - a.second[k]) * wb for k in a.second}
    return _Stats(n, mean, m2, second)


def _chunk_stats(key, chunk_id, params, spec, mean, factor, num_samples, chunk_size, second_moments, acc) -> _Stats:
    z = jax.random.normal(jax.random.fold_in(key, chunk_id), (chunk_size, mean.shape[0]), mean.dtype)
    row = chunk_id * chunk_size + jnp.arange(chunk_size)
    w = ((row < num_samples) & (chunk_id >= 0)).astype(mean.dtype)
    count = jnp.sum(w)
    safe = jnp.maximum(count, 1.0)
    layers = forward(params, spec, mean + z @ factor.T, all_layers=True)
    m, m2, sec = {}, {}, {} if second_moments else None
    for k, x in layers.items():
        mu = jnp.sum(w[:, None] * x, axis=0) / safe
        dev = (x - mu) * w[:, None]
        m[k], m2[k] = mu.astype(acc), jnp.sum(dev * dev, axis=0).astype(acc)
        if second_moments:
            sec[k] = ((w[:, None] * x).T @ x / safe).astype(acc)
    return _Stats(count.astype(acc), m, m2, sec)


def _scan_chunks(key, chunk_ids, params, spec, mean, factor, num_samples, chunk_size, second_moments) -> _Stats:
    acc = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    stats = functools.partial(_chunk_stats, key, params=params, spec=spec, mean=mean, factor=factor, num_samples=num_samples,
                              chunk_size=chunk_size, second_moments=second_moments, acc=acc)
    first = stats(chunk_ids[0])

    def body(carry, cid):
        return _merge(carry, stats(cid)), None

    out, _ = jax.lax.scan(body, first, chunk_ids[1:])
    return out


def _result(s: _Stats, num_samples: int) -> MCResult:
    sem = {k: jnp.sqrt(s.m2[k] / max(num_samples - 1, 1) / num_samples) for k in s.mean}
    return MCResult(s.mean, sem, s.second, num_samples)


def _check(params, spec, mean, cov, num_samples, chunk_size):
    if num_samples < 2 or chunk_size < 1:
        raise ValueError(f"need num_samples >= 2 and chunk_size >= 1, got {num_samples}, {chunk_size}")
    layers = layer_weights(params)
    if len(layers) != spec.num_layers:
        raise ValueError(f"params have {len(layers)} layers, spec says {spec.num_layers}")
    for l, ((W, b), (a, c)) in enumerate(zip(layers, zip(spec.dims[:-1], spec.dims[1:]))):
        if W.shape[-2:] != (a, c):
            raise ValueError(f"layer {l}: kernel shape {W.shape} != ({a}, {c})")
    if not isinstance(mean, jax.core.Tracer) and not isinstance(cov, jax.core.Tracer):
        validate_gaussian_input(mean, cov, spec.input_dim)
    for l, (W, b) in enumerate(layers):
        for x in (W, b):
            if x is not None and not isinstance(x, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(x))):
                raise ValueError(f"layer {l} parameters contain NaN or Inf")


def monte_carlo(key, params, spec: MLPSpec, mean, cov, num_samples: int, chunk_size: int = 16384,
                second_moments: bool = False) -> MCResult:
    """Sample mean (and standard error, optionally E[x x^T]) of every layer over ``num_samples``
    inputs ``x ~ N(mean (d,), cov (d, d))``, streamed in chunks of ``chunk_size``.

    Pure in (key, params, mean, cov): jit it with the other arguments static, vmap it over networks
    (see :func:`monte_carlo_batched`). The forward pass runs in the dtype of ``mean``.
    """
    _check(params, spec, mean, cov, num_samples, chunk_size)
    mean = jnp.asarray(mean)
    num_chunks = math.ceil(num_samples / chunk_size)
    s = _scan_chunks(key, jnp.arange(num_chunks), params, spec, mean, _input_factor(jnp.asarray(cov, mean.dtype)),
                     num_samples, chunk_size, second_moments)
    return _result(s, num_samples)


def monte_carlo_batched(key, batched_params, spec: MLPSpec, mean, cov, num_samples: int, chunk_size: int = 16384,
                        second_moments: bool = False) -> MCResult:
    """:func:`monte_carlo` vmapped over a leading network axis of ``batched_params`` (one key each)."""
    num = jax.tree_util.tree_leaves(batched_params)[0].shape[0]
    keys = jax.random.split(key, num)
    fn = lambda k, p: monte_carlo(k, p, spec, mean, cov, num_samples, chunk_size, second_moments)  # noqa: E731
    return jax.vmap(fn)(keys, batched_params)


def monte_carlo_sharded(key, params, spec: MLPSpec, mean, cov, num_samples: int, chunk_size: int = 16384,
                        second_moments: bool = False, mesh: jax.sharding.Mesh | None = None) -> MCResult:
    """:func:`monte_carlo` with the chunks spread over the devices of a 1-D mesh (default: all
    devices). Same chunks and keys as on one device, so the same answer up to merge order."""
    _check(params, spec, mean, cov, num_samples, chunk_size)
    mesh = mesh or jax.sharding.Mesh(np.array(jax.devices()), ("chunks",))
    axis = mesh.axis_names[0]
    devices = mesh.shape[axis]
    num_chunks = math.ceil(num_samples / chunk_size)
    per_device = math.ceil(num_chunks / devices)
    ids = np.full(devices * per_device, -1, np.int32)  # -1: padding, contributes nothing
    ids[:num_chunks] = np.arange(num_chunks)
    ids = ids.reshape(per_device, devices).T.reshape(-1)  # round-robin: balanced partial chunk
    mean = jnp.asarray(mean)
    factor = _input_factor(jnp.asarray(cov, mean.dtype))
    P = jax.sharding.PartitionSpec
    shard_map = getattr(jax, "shard_map", None) or __import__("jax.experimental.shard_map", fromlist=["shard_map"]).shard_map

    def local(ids):
        s = _scan_chunks(key, ids, params, spec, mean, factor, num_samples, chunk_size, second_moments)
        return jax.tree_util.tree_map(lambda x: x[None], s)

    parts = shard_map(local, mesh=mesh, in_specs=P(axis), out_specs=P(axis))(jnp.asarray(ids))
    s = jax.tree_util.tree_map(lambda x: x[0], parts)
    for d in range(1, devices):
        s = _merge(s, jax.tree_util.tree_map(lambda x, d=d: x[d], parts))
    return _result(s, num_samples)
