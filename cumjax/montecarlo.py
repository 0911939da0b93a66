"""Monte Carlo on the same parameters: the baseline and the ground truth.

Sampling: sample ``i`` (``0 <= i < N``) is ``x_i = mean + z_i @ F.T`` with ``z_i ~ N(0, I)`` drawn from
``fold_in(key, i)`` and ``F F^T = cov`` (Cholesky, or a symmetric eigen-root when ``cov`` is
singular; computed once). A sample depends only on ``(key, i)``, so the result is the same, up to
float rounding in the merges, for every chunk size and every number of devices.

Streaming: the samples are pushed through the network in chunks of ``chunk_size`` rows by a
``lax.scan``, so memory does not grow with N. When the chunk size does not divide the samples (of
a device), the last chunk is padded with masked rows, which are computed and discarded.

Precision: the forward pass runs in ``dtype`` (float32 by default) at ``Precision.HIGHEST`` (no TF32
on GPUs, see :mod:`cumjax.mlp`). Each chunk's mean, sum of squared deviations and mean of x x^T are
formed in that dtype and merged across chunks and devices with Chan et al.'s parallel update in the
accumulation dtype: float64 when jax x64 is enabled, else float32. The update never subtracts large
running sums, so even float32 accumulation loses only about one rounding per chunk. The normals
are drawn in the forward dtype: float32 ones (an erfinv of a 23-bit uniform) never exceed ~5.4
sigma, so events rarer than ~1e-7 need ``dtype=jnp.float64`` (x64 enabled).
"""

from __future__ import annotations

import functools
import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import _sampling as smp
from .gaussian import Gaussian, check_gaussian
from .mlp import MLPSpec, validate_params


@struct.dataclass
class MCResult:
    """Per label (see :attr:`MLPSpec.labels`): sample ``mean`` (..., n), its standard error ``sem``
    (..., n) = sqrt(sample variance / N), and with ``second_moments`` the sample ``second`` moment
    E[x x^T] (..., n, n), else None. Leading ``...``: the network axis of the batched sampler."""

    mean: dict
    sem: dict
    second: dict | None
    num_samples: int = struct.field(pytree_node=False)


_STATIC = ("spec", "num_samples", "chunk", "num_chunks", "second_moments")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _run(key, params, mean, factor, *, spec, num_samples, chunk, num_chunks, second_moments) -> smp.Stats:
    return smp.stream(
        key, params, spec, mean, factor, jnp.uint32(0), jnp.uint32(num_samples), num_chunks, chunk, second_moments
    )


@functools.partial(jax.jit, static_argnames=_STATIC + ("per_device", "mesh"))
def _run_sharded(
    key, params, mean, factor, *, spec, num_samples, chunk, num_chunks, second_moments, per_device, mesh
) -> smp.Stats:
    axis = mesh.axis_names[0]
    P = jax.sharding.PartitionSpec

    def local(key, params, mean, factor):  # device d takes samples [d * per_device, (d + 1) * per_device)
        first = jax.lax.axis_index(axis).astype(jnp.uint32) * jnp.uint32(per_device)
        stop = jnp.minimum(first + jnp.uint32(per_device), jnp.uint32(num_samples))
        s = smp.stream(key, params, spec, mean, factor, first, stop, num_chunks, chunk, second_moments)
        return jax.tree_util.tree_map(lambda x: x[None], s)

    # check_vma off: the scan's zero initial carry is replicated while its updates vary per device
    parts = jax.shard_map(local, mesh=mesh, in_specs=P(), out_specs=P(axis), check_vma=False)(key, params, mean, factor)
    s = jax.tree_util.tree_map(lambda x: x[0], parts)
    for d in range(1, mesh.shape[axis]):
        s = smp.merge_stats(s, jax.tree_util.tree_map(lambda x, d=d: x[d], parts))
    return s


def result_of(s: smp.Stats, num_samples: int) -> MCResult:
    sem = {k: jnp.sqrt(s.m2[k] / (num_samples - 1) / num_samples) for k in s.m2}
    return MCResult(s.mean, sem, s.second, num_samples)


# ----------------------------------------------------------------------------- inputs and plan


def plan_chunks(num_samples, chunk_size, devices: int = 1) -> tuple[int, int, int]:
    """``(samples per device, chunk, chunks per device)``; the chunk never exceeds a device's share."""
    num_samples = smp.check_num_samples(num_samples)
    per_device = -(-num_samples // devices)
    chunk = smp.check_chunk_size(chunk_size, per_device)
    if devices * per_device + chunk > smp.MAX_ROWS:
        raise ValueError(
            f"at most ~{smp.MAX_ROWS:.3g} samples per call (uint32 sample index); combine runs with different keys"
        )
    return per_device, chunk, -(-per_device // chunk)


def prepare(params, spec, gaussian, dtype, batch_dims=0):
    """Validate (shapes always, values where concrete) and cast to the forward dtype:
    ``(params, mean, factor)`` with inputs ``mean + e @ factor.T`` (factor None: identity cov)."""
    if not isinstance(spec, MLPSpec):
        raise TypeError(f"spec must be a cumjax.MLPSpec, got {type(spec).__name__}")
    validate_params(params, spec, batch_dims)
    check_gaussian(gaussian, spec.input_dim)
    if dtype is None:
        dtype = jnp.result_type(gaussian.mean, *jax.tree_util.tree_leaves(params), float)
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)
    mean, factor = smp.whitened(gaussian, dtype)
    return params, mean, factor


_LEGACY = inspect.signature(lambda key, params, spec, mean, cov, num_samples, *args, **kwargs: None)


def _accepts_legacy(fn):
    """Let ``fn(key, params, spec, gaussian, num_samples, ...)`` also take the deprecated form
    ``fn(key, params, spec, mean, cov, num_samples, ...)`` (with a DeprecationWarning)."""

    @functools.wraps(fn)
    def wrapper(key, params, spec, gaussian=None, *args, **kwargs):
        if isinstance(gaussian, Gaussian):
            return fn(key, params, spec, gaussian, *args, **kwargs)
        a = _LEGACY.bind(key, params, spec, gaussian, *args, **kwargs).arguments
        warnings.warn(
            f"{fn.__name__}(key, params, spec, mean, cov, num_samples, ...) is deprecated: use "
            f"{fn.__name__}(key, params, spec, cumjax.Gaussian(mean, cov), num_samples, ...)",
            DeprecationWarning,
            stacklevel=2,
        )
        return fn(
            key,
            params,
            spec,
            Gaussian(a["mean"], a["cov"]),
            a["num_samples"],
            *a.get("args", ()),
            **a.get("kwargs", {}),
        )

    return wrapper


# ----------------------------------------------------------------------------- public


@_accepts_legacy
def monte_carlo(
    key,
    params,
    spec: MLPSpec,
    gaussian: Gaussian,
    num_samples: int,
    chunk_size: int | None = None,
    second_moments: bool = False,
    dtype=jnp.float32,
) -> MCResult:
    """Sample mean and standard error (optionally E[x x^T]) of every layer over ``num_samples``
    inputs ``x ~ gaussian``, streamed in chunks of ``chunk_size`` rows (default
    :func:`cumjax._sampling.default_chunk_size`; at most ``num_samples``).

    A jitted function of ``(key, params, gaussian)``; ``spec``, the sizes, ``second_moments`` and
    ``dtype`` are static. It may itself be called under jit/vmap/grad with any of those traced
    (shapes are checked always, values where concrete). dtype: of the forward pass; None keeps
    that of params and the input. Deterministic for a given key.
    """
    _, chunk, num_chunks = plan_chunks(num_samples, chunk_size)
    params, mean, factor = prepare(params, spec, gaussian, dtype)
    s = _run(
        key,
        params,
        mean,
        factor,
        spec=spec,
        num_samples=int(num_samples),
        chunk=chunk,
        num_chunks=num_chunks,
        second_moments=second_moments,
    )
    return result_of(s, int(num_samples))


@_accepts_legacy
def monte_carlo_batched(
    key,
    batched_params,
    spec: MLPSpec,
    gaussian: Gaussian,
    num_samples: int,
    chunk_size: int | None = None,
    second_moments: bool = False,
    dtype=jnp.float32,
) -> MCResult:
    """:func:`monte_carlo` vmapped over a leading network axis of ``batched_params``; network ``i``
    uses ``jax.random.split(key, B)[i]``. Every field of the result gains that leading axis."""
    _, chunk, num_chunks = plan_chunks(num_samples, chunk_size)
    params, mean, factor = prepare(batched_params, spec, gaussian, dtype, batch_dims=1)
    keys = jax.random.split(key, jax.tree_util.tree_leaves(params)[0].shape[0])
    run = functools.partial(
        _run,
        mean=mean,
        factor=factor,
        spec=spec,
        num_samples=int(num_samples),
        chunk=chunk,
        num_chunks=num_chunks,
        second_moments=second_moments,
    )
    return result_of(jax.vmap(run)(keys, params), int(num_samples))


@_accepts_legacy
def monte_carlo_sharded(
    key,
    params,
    spec: MLPSpec,
    gaussian: Gaussian,
    num_samples: int,
    mesh: jax.sharding.Mesh | None = None,
    chunk_size: int | None = None,
    second_moments: bool = False,
    dtype=jnp.float32,
) -> MCResult:
    """:func:`monte_carlo` with the samples split evenly over the devices of a 1-D ``mesh``
    (default: all devices); each device streams its share, the statistics are merged at the end.
    Same samples as on one device, so the same result up to rounding in the merges."""
    mesh = mesh or jax.sharding.Mesh(np.array(jax.devices()), ("samples",))
    if len(mesh.axis_names) != 1:
        raise ValueError(f"need a 1-D mesh, got axes {mesh.axis_names}")
    per_device, chunk, num_chunks = plan_chunks(num_samples, chunk_size, mesh.size)
    params, mean, factor = prepare(params, spec, gaussian, dtype)
    s = _run_sharded(
        key,
        params,
        mean,
        factor,
        spec=spec,
        num_samples=int(num_samples),
        chunk=chunk,
        num_chunks=num_chunks,
        second_moments=second_moments,
        per_device=per_device,
        mesh=mesh,
    )
    return result_of(s, int(num_samples))
