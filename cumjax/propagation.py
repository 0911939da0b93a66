"""The estimator: cumulant propagation through a whole MLP (ARC, arXiv 2605.05179).

Between layers the state is a *tower*, ``{degree d: tensor}``, holding the tracked joint
cumulants of one layer. Each hidden layer runs the exact :func:`cumjax.linear.linear_step` and a
nonlinear step (:class:`cumjax.nonlinear.NonlinearStep`, or the low-rank
:class:`cumjax.nonlinear_factored.FactoredStep`); the output layer runs the linear step only. All
combinatorics is decided in Python at trace time from the static configuration, so under
``jax.jit`` one fused program is compiled per (network shape, configuration).

Checks, before any work: the configuration, every array's shape and dtype, and the memory model
always; the values (finite weights; a finite, symmetric, PSD input covariance) whenever they are
concrete, i.e. not traced by ``jit``/``vmap``/``grad`` (a traced argument's values are unknown
until run time).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from . import diagrams as dg
from .config import PropagationConfig, check_config
from .cumulants import Cumulants
from .gaussian import Gaussian, check_gaussian
from .linear import linear_step
from .lowrank import rank_sharding
from .memory import check_memory
from .mlp import Init, MLPSpec, layer_weights, validate_params
from .nonlinear import NonlinearStep
from .nonlinear_factored import FactoredStep
from .radial import RadialTensor

Array = jax.Array
Tower = dict  # degree -> RadialTensor | FactoredTensor


def input_tower(gaussian: Gaussian, config: PropagationConfig) -> Tower:
    """The Gaussian input N(mean, cov) as a tower (higher cumulants vanish)."""
    mean, cov = jnp.asarray(gaussian.mean), jnp.asarray(gaussian.cov)
    n = mean.shape[0]
    if dg.radial_index(2, config.k_max, config.kind) == 0:
        return {1: RadialTensor(mean), 2: RadialTensor(cov)}
    # k_max = 1: only the trace of the covariance is carried.
    return {1: RadialTensor(mean), 2: RadialTensor(jnp.trace(cov) / n, 1, None, n)}


# ----------------------------------------------------------------------------- legacy call forms

_LEGACY = inspect.signature(
    lambda params, activations, mean, cov, config=PropagationConfig(), weight_variances=None, unroll=False: None
)


def legacy_spec(params, activations, weight_variances=None, config: PropagationConfig | None = None) -> MLPSpec:
    """The :class:`MLPSpec` of raw params and activation names (the old call form): shapes from the
    kernels, a manual init with ``weight_variances`` (fan_in * Var(W) per linear layer)."""
    layers = layer_weights(params)
    L = len(layers)
    shapes = [np.shape(W) for W, _ in layers]
    if any(len(s) != 2 for s in shapes):
        raise ValueError(f"params kernels must be 2-D (in, out), got shapes {shapes}")
    hidden = {s[1] for s in shapes[:-1]}
    if len(hidden) > 1:
        raise ValueError(f"hidden layers must share one width, got {sorted(hidden)}")
    if config is not None and config.avg_metric and weight_variances is None:
        raise ValueError("avg_metric=True needs weight_variances (fan_in * Var(W) per linear layer)")
    if weight_variances is not None and np.ndim(weight_variances) == 1 and len(weight_variances) != L:
        raise ValueError(f"weight_variances needs one entry per linear layer ({L}), got {len(weight_variances)}")
    init = Init(
        kind="manual", w_var=(1.0,) * L if weight_variances is None else tuple(np.asarray(weight_variances, float))
    )
    width = hidden.pop() if hidden else shapes[-1][1]
    use_bias = any(b is not None for _, b in layers)
    return MLPSpec(shapes[0][0], width, shapes[-1][1], L, tuple(activations), use_bias, init)


def _accepts_legacy(fn):
    """Let ``fn(params, spec, gaussian, config, ...)`` also take the deprecated form
    ``fn(params, activations, mean, cov, config, weight_variances)`` (with a DeprecationWarning)."""

    @functools.wraps(fn)
    def wrapper(params, spec, *args, **kwargs):
        if isinstance(spec, MLPSpec):
            return fn(params, spec, *args, **kwargs)
        a = _LEGACY.bind(params, spec, *args, **kwargs).arguments
        warnings.warn(
            f"{fn.__name__}(params, activations, mean, cov, config, weight_variances) is deprecated: use "
            f"{fn.__name__}(params, spec, cumjax.Gaussian(mean, cov), config)",
            DeprecationWarning,
            stacklevel=2,
        )
        config = check_config(a.get("config", PropagationConfig()))
        spec = legacy_spec(params, a["activations"], a.get("weight_variances"), config)
        extra = {"unroll": a["unroll"]} if "unroll" in a else {}
        return fn(params, spec, Gaussian(a["mean"], a["cov"]), config, **extra)

    return wrapper


# ----------------------------------------------------------------------------- driver


def validate(params, spec: MLPSpec, gaussian: Gaussian, config: PropagationConfig) -> list:
    """All checks :func:`propagate` runs before any work (module docstring); returns the layers."""
    check_config(config)
    if not isinstance(spec, MLPSpec):
        raise TypeError(f"spec must be a cumjax.MLPSpec, got {type(spec).__name__}")
    layers = validate_params(params, spec)
    check_gaussian(gaussian, spec.input_dim)
    if config.mesh is not None and spec.width % config.mesh.size:
        raise ValueError(
            f"config.mesh has {config.mesh.size} devices, which must divide the width {spec.width} (rank blocks are "
            f"multiples of the width)"
        )
    itemsize = np.dtype(jnp.result_type(gaussian.mean)).itemsize
    check_memory(max(spec.dims[1:]), spec.num_layers, config, itemsize)
    return layers


@_accepts_legacy
def propagate(
    params, spec: MLPSpec, gaussian: Gaussian, config: PropagationConfig = PropagationConfig(), *, unroll: bool = False
) -> Cumulants:
    """Cumulants of every layer of an MLP on a Gaussian input.

    params: Flax variables of :class:`cumjax.MLP` (or a list of ``(W (in, out), b or None)``).
    spec: the network (:class:`cumjax.MLPSpec`: shapes, activations, initialisation).
    gaussian: the input distribution :class:`cumjax.Gaussian` ``N(mean (d_in,), cov (d_in, d_in))``.
    config: the estimator (:class:`cumjax.PropagationConfig`).
    unroll: trace every layer separately instead of scanning over equal hidden layers (longer
        compile; XLA's cost analysis then counts every layer).
    Returns :class:`cumjax.Cumulants` for the labels ``pre0, act0, ..., pre{L-1}``.
    Pure and traceable: ``jax.jit`` with ``spec`` and ``config`` static, ``vmap`` over params or
    inputs, ``grad`` w.r.t. params and input moments.
    """
    layers = validate(params, spec, gaussian, config)
    if config.mesh is None:
        return _propagate(layers, spec, gaussian, config, unroll)
    # Always one program: run eagerly, every sharded contraction would be its own compiled call.
    return _propagate_sharded(layers, spec, gaussian, config, unroll)


@functools.partial(jax.jit, static_argnums=(1, 3, 4))
def _propagate_sharded(layers, spec: MLPSpec, gaussian: Gaussian, config: PropagationConfig, unroll: bool):
    with rank_sharding(config.mesh):
        return _propagate(layers, spec, gaussian, config, unroll)


def _propagate(layers, spec: MLPSpec, gaussian: Gaussian, config: PropagationConfig, unroll: bool) -> Cumulants:
    activations = spec.activations
    tower = input_tower(gaussian, config)
    radial = any(r > 0 for r in dg.tracked_degrees(config.k_max, config.kind).values())

    def hidden_metric(w_var):
        if not radial:
            return 1.0  # no radial pieces are tracked: the metric is never read
        if config.avg_metric:
            return w_var
        return "diag" if config.k_max == 1 else "exact"

    factored = config.is_factored
    step = FactoredStep if factored else NonlinearStep

    def hidden_layer(tower, W, b, act, w_var):
        pre = linear_step(tower, W, b, hidden_metric(w_var), list(tower))
        return pre, step(pre, act, config).output()

    L = len(layers)
    w_vars = list(spec.weight_variances) if config.avg_metric else [None] * L
    out = {}
    # Hidden layers after the first share one tower structure: with equal shapes and
    # activations, scan over them so compile time does not grow with depth.
    scan_from, scan_to = 1, L - 1
    # The exact factored top cumulant's rank grows by O(n) per layer, so layers differ in shape and
    # cannot share a scan body; padding every layer to the last layer's rank would multiply the
    # early layers' cost (up to ~L/2 times on average), so that path is unrolled: compile time
    # grows with depth instead. With rank_layers = m the rank is constant from hidden layer m on,
    # so layers whose input and output both have it (m + 1 on) are scanned.
    if factored:
        scan_from = L if config.rank_layers is None else config.rank_layers + 1
    scannable = (
        not unroll and scan_to - scan_from >= 2 and len({activations[l] for l in range(scan_from, scan_to)}) == 1
    )
    scannable = scannable and len({(layers[l][0].shape, layers[l][1] is None) for l in range(scan_from, scan_to)}) == 1
    l = 0
    while l < L - 1:
        if scannable and l == scan_from:
            stack = lambda xs: None if xs[0] is None else jnp.stack(xs)  # noqa: E731
            Ws = stack([layers[i][0] for i in range(scan_from, scan_to)])
            bs = stack([layers[i][1] for i in range(scan_from, scan_to)])
            vs = None if w_vars[scan_from] is None else jnp.asarray(w_vars[scan_from:scan_to], Ws.dtype)

            def body(tower, x, act=activations[scan_from]):
                W, b, v = x
                pre, post = hidden_layer(tower, W, b, act, v)
                return post, (pre, post)

            tower, (pres, posts) = jax.lax.scan(body, tower, (Ws, bs, vs))
            for i in range(scan_to - scan_from):
                out[f"pre{scan_from + i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], pres)
                out[f"act{scan_from + i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], posts)
            l = scan_to
            continue
        pre, tower = hidden_layer(tower, *layers[l], activations[l], w_vars[l])
        out[f"pre{l}"], out[f"act{l}"] = pre, tower
        l += 1
    W, b = layers[-1]
    keep = [d for d in tower if config.output_degree is None or d <= config.output_degree]
    out[f"pre{L - 1}"] = linear_step(tower, W, b, "diag" if config.k_max == 1 else "exact", keep)
    return Cumulants(out)


@_accepts_legacy
def estimate_mean(
    params, spec: MLPSpec, gaussian: Gaussian, config: PropagationConfig = PropagationConfig(), *, unroll: bool = False
) -> Array:
    """The estimated expected network output ``(d_out,)`` (:func:`propagate` with only the mean
    passed through the output layer)."""
    config = dataclasses.replace(check_config(config), output_degree=1)
    return propagate(params, spec, gaussian, config, unroll=unroll).mean()
