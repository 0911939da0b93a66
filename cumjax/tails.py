"""Tail probabilities of neurons through the estimator, and their plain Monte Carlo ground truth.

As in the paper: for ``z = pre{layer}`` of an MLP, ``P(z_i > t)`` is the mean output of the
*thresholded network*: the layers up to ``layer`` with bias ``b - t``, a heaviside nonlinearity,
and a fixed 0/1 selection layer ``(n, m)`` as output, so its output is the indicator
``1[z_i > t]`` of the selected neurons and cumulant propagation estimates its mean. For tiny
probabilities see :mod:`cumjax.importance` (importance-sampled ground truth).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import _sampling as smp
from .config import PropagationConfig, check_config
from .flopcount import compiled_cost, jaxpr_flops
from .flops import forward_flops
from .gaussian import Gaussian, check_gaussian
from .mlp import Init, MLPSpec, forward, layer_weights, params_from_arrays, validate_params
from .propagation import propagate

Array = jax.Array


# ----------------------------------------------------------------------------- networks


def _check_layer(num_layers: int, layer: int) -> None:
    if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool) or not 0 <= layer < num_layers:
        raise ValueError(f"layer must be an int in [0, {num_layers}), got {layer!r}")


def truncated_spec(spec: MLPSpec, layer: int) -> MLPSpec:
    """The network up to linear layer ``layer``: its output is ``z = pre{layer}``."""
    _check_layer(spec.num_layers, layer)
    hidden = spec.dims[1 : layer + 1]
    width = hidden[0] if hidden else spec.dims[layer + 1]
    w_var, b_var, b_mean = (v[: layer + 1] for v in spec.init.resolve(spec))
    init = Init(kind="manual", w_var=w_var, b_var=b_var, b_mean=b_mean)
    return MLPSpec(
        spec.input_dim, width, spec.dims[layer + 1], layer + 1, spec.activations[:layer], spec.use_bias, init
    )


def truncated_params(params, layer: int):
    """Flax variables of the layers ``0..layer`` (pure: pytree in, pytree out)."""
    layers = layer_weights(params)
    _check_layer(len(layers), layer)
    return {"params": {f"layer{l}": _layer_dict(W, b) for l, (W, b) in enumerate(layers[: layer + 1])}}


def _layer_dict(W, b):
    return {"kernel": W} | ({} if b is None else {"bias": b})


def thresholded_spec(spec: MLPSpec, layer: int, num_outputs: int | None = None) -> MLPSpec:
    """Spec of the thresholded network for ``z = pre{layer}`` (see the module docstring): the layers
    up to ``z``, heaviside on ``z - t``, selection output of ``num_outputs`` neurons (default: all
    of ``z``). ``z`` must have the hidden width (every hidden layer of an :class:`MLPSpec` has one
    width). Its init keeps the original weight variances (selection layer: 1)."""
    trunc = truncated_spec(spec, layer)
    if trunc.output_dim != trunc.width:
        raise ValueError(
            f"pre{layer} has {trunc.output_dim} units but the hidden width is {trunc.width}; "
            f"threshold a hidden layer (or a net whose output has the hidden width)"
        )
    m = trunc.output_dim if num_outputs is None else int(num_outputs)
    init = Init(kind="manual", w_var=trunc.weight_variances + (1.0,))
    return MLPSpec(spec.input_dim, trunc.width, m, layer + 2, trunc.activations + ("heaviside",), True, init)


def threshold_params(params, layer: int, threshold, neurons: Sequence[int] | None = None):
    """Flax variables of the thresholded network whose output is ``1[z_i > t_i]`` for ``z = pre{layer}``.

    params: the original network's variables; threshold: ``()`` or ``(n,)`` (per neuron of ``z``),
    traced or concrete; neurons: static indices of the ``m`` output units (default all ``n``).
    Every layer gets a bias (zeros where the original has none) so that the result matches
    ``MLP(thresholded_spec(...))``. Pure; differentiable in ``params`` and ``threshold``."""
    layers = layer_weights(params)
    _check_layer(len(layers), layer)
    Ws, bs = [], []
    for l, (W, b) in enumerate(layers[: layer + 1]):
        b = jnp.zeros(W.shape[1], W.dtype) if b is None else b
        Ws.append(W)
        bs.append(b - jnp.asarray(threshold, W.dtype) if l == layer else b)
    n = Ws[-1].shape[1]
    idx = np.arange(n) if neurons is None else np.asarray(neurons)
    if idx.ndim != 1 or idx.size == 0 or idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"neurons must be indices into the {n} units of pre{layer}, got {neurons!r}")
    dtype = Ws[-1].dtype
    select = np.zeros((n, idx.size))
    select[idx, np.arange(idx.size)] = 1.0
    Ws.append(jnp.asarray(select, dtype))
    bs.append(jnp.zeros(idx.size, dtype))
    return params_from_arrays(Ws, bs)


def tail_probabilities(
    params,
    spec: MLPSpec,
    gaussian: Gaussian,
    layer: int,
    thresholds,
    config: PropagationConfig = PropagationConfig(),
    neurons: Sequence[int] | None = None,
    unroll: bool = False,
) -> Array:
    """Estimated ``P(z_i > t)`` for ``z = pre{layer}``: ``(T, m)`` for ``thresholds (T,)`` or ``(T, n)``.

    One estimator run per threshold, vmapped: only the heaviside step and the output depend on the
    threshold, so the layers before it are computed once. Jittable (``spec``, ``layer``,
    ``config``, ``neurons`` static; params, input and thresholds may be traced) and differentiable
    in ``params``, the input and the thresholds. ``avg_metric`` uses ``spec.init``'s variances."""
    check_config(config)
    validate_params(params, spec)
    thresholds = jnp.asarray(thresholds)
    if thresholds.ndim not in (1, 2):
        raise ValueError(f"thresholds must have shape (T,) or (T, n), got {thresholds.shape}")
    tspec = thresholded_spec(spec, layer, None if neurons is None else len(neurons))
    cfg = dataclasses.replace(config, output_degree=1)

    def one(t):
        return propagate(threshold_params(params, layer, t, neurons), tspec, gaussian, cfg, unroll=unroll).mean()

    return jax.vmap(one)(thresholds)


def tail_flops(
    params, spec: MLPSpec, gaussian: Gaussian, layer: int, thresholds, config=PropagationConfig(), neurons=None
) -> dict:
    """FLOPs of :func:`tail_probabilities` for all thresholds at once: ``analytic`` (the jaxpr count
    of :func:`cumjax.flopcount.jaxpr_flops`, the same rule as :func:`cumjax.estimator_flops`) and
    ``xla`` (XLA's cost analysis of the unrolled program, flops + transcendentals)."""
    t = jnp.asarray(thresholds)

    def fn(p, g, t, unroll=False):
        return tail_probabilities(p, spec, g, layer, t, config, neurons, unroll)

    analytic = jaxpr_flops(fn, params, gaussian, t).total
    xla = compiled_cost(functools.partial(fn, unroll=True), params, gaussian, t)
    return dict(analytic=float(analytic), xla=xla["flops"] + xla["transcendentals"])


def sample_flops(spec: MLPSpec, layer: int, num_thresholds: int) -> int:
    """FLOPs per Monte Carlo sample of every tail indicator: the forward pass up to ``z`` (see
    :func:`cumjax.forward_flops`) plus one comparison per (threshold, neuron)."""
    trunc = truncated_spec(spec, layer)
    return forward_flops(trunc) + num_thresholds * trunc.output_dim


# ----------------------------------------------------------------------------- plain sampling


@dataclasses.dataclass(frozen=True)
class TailEstimate:
    """Sampled tail probabilities: ``mean`` and standard error ``sem`` (same shape), ``num_samples``."""

    mean: np.ndarray
    sem: np.ndarray
    num_samples: int


def moments(s1, s2, n):
    """Mean and its standard error from the sums of ``y`` and ``y^2`` over ``n`` samples."""
    mean = s1 / n
    var = jnp.maximum(s2 / n - mean**2, 0.0) * n / (n - 1)
    return mean, jnp.sqrt(var / n)


def prepare_sampling(params, spec: MLPSpec, gaussian: Gaussian, layer: int, dtype):
    """``(truncated spec, its params in dtype, whitened mean, factor)`` for sampling ``z = pre{layer}``."""
    validate_params(params, spec)
    check_gaussian(gaussian, spec.input_dim)
    trunc = truncated_spec(spec, layer)
    tp = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), truncated_params(params, layer))
    mean, factor = smp.whitened(gaussian, dtype)
    return trunc, tp, mean, factor


@functools.partial(jax.jit, static_argnames=("spec", "num_chunks", "chunk"))
def _tail_sums(key, params, mean, factor, thresholds, num_samples, *, spec, num_chunks, chunk):
    """Counts of ``z > t`` over ``num_samples`` inputs, ``(T, n)`` for thresholds ``(T, n)``; the
    sample count is traced (one compile for every count up to ``num_chunks * chunk``)."""
    acc, d = smp.accumulation_dtype(), mean.shape[0]

    def body(total, c):
        e = jax.random.normal(jax.random.fold_in(key, c), (chunk, d), mean.dtype)
        z = forward(params, spec, smp.to_inputs(e, mean, factor))
        valid = c * chunk + jnp.arange(chunk) < num_samples
        hit = (z[:, None, :] > thresholds[None]) & valid[:, None, None]
        return total + jnp.sum(hit, axis=0, dtype=acc), None

    total, _ = jax.lax.scan(body, jnp.zeros(thresholds.shape, acc), jnp.arange(num_chunks))
    return total


def tail_monte_carlo(
    key,
    params,
    spec: MLPSpec,
    gaussian: Gaussian,
    layer: int,
    thresholds,
    num_samples: int,
    chunk_size: int | None = None,
    dtype=jnp.float32,
) -> TailEstimate:
    """Plain Monte Carlo of ``P(z_i > t)`` for ``z = pre{layer}``: every threshold row ``(T, n)``
    (or ``(T,)``, the same for all neurons) and neuron from the same ``num_samples`` inputs.
    Returns ``(T, n)`` frequencies and standard errors ``sqrt(p (1 - p) / (N - 1))``."""
    num_samples = smp.check_num_samples(num_samples)
    chunk = smp.check_chunk_size(chunk_size)  # not capped at num_samples: small counts share a compile
    trunc, tp, mean, factor = prepare_sampling(params, spec, gaussian, layer, dtype)
    t = jnp.asarray(thresholds, dtype)
    t = jnp.broadcast_to(t.reshape(t.shape[0], -1), (t.shape[0], trunc.output_dim))
    count = _tail_sums(
        key,
        tp,
        mean,
        factor,
        t,
        jnp.asarray(num_samples, jnp.int64 if jax.config.jax_enable_x64 else jnp.int32),
        spec=trunc,
        num_chunks=-(-num_samples // chunk),
        chunk=chunk,
    )
    m, se = moments(count, count, num_samples)
    return TailEstimate(np.asarray(m), np.asarray(se), num_samples)
