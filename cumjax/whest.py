"""WhestBench adapter: run cumjax estimators on ARC's WhestBench networks and score them there.

WhestBench (``pip install whestbench``, an optional extra: ``pip install 'cumjax[whest]'``) draws
ReLU MLPs of ``depth`` square weight matrices ``W_l (width, width)`` with entries ``N(0, 2/width)``,
no biases and a ReLU after *every* layer: ``x_{l+1} = relu(x_l @ W_l)`` with ``x_0 ~ N(0, I)``. The
task is the mean of every post-activation layer, ``E[x_{l+1}]`` for ``l < depth``, a ``(depth, width)``
array; its primary score is the final-layer MSE, its secondary the all-layer MSE.

A cumjax network ends with a linear layer (no nonlinearity after it), so a WhestBench network is the
cumjax network of ``depth + 1`` linear layers whose last kernel is the identity: ``act{l}`` is
WhestBench's layer ``l`` (its ``x_{l+1}``) for every ``l < depth``, the last one included, and the
identity output layer only ever carries a mean (``output_degree=1``), at ``2 width^2`` FLOPs.

Only :func:`make_estimator` / :class:`CumjaxEstimator` and :func:`whest_forward` import whestbench
(lazily, with a clear error when it is missing); the conversions below need cumjax alone.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import PropagationConfig
from .flopcount import compiled_cost, jaxpr_flops
from .gaussian import Gaussian
from .mlp import Init, MLPSpec, forward, params_from_arrays
from .propagation import propagate

WHEST_REQUIREMENT = "whestbench>=0.16"
#: WhestBench's He initialisation: every layer, the first included, has fan_in * Var(W) = 2.
WHEST_W_VAR = 2.0


def require_whestbench():
    """Import and return ``whestbench``; raise ImportError with the install line if it is missing."""
    try:
        import whestbench
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            f"the WhestBench adapter needs {WHEST_REQUIREMENT!r}: pip install 'cumjax[whest]' "
            f"(or pip install '{WHEST_REQUIREMENT}')"
        ) from e
    return whestbench


# ----------------------------------------------------------------------------- conversion


def whest_weights(mlp_or_weights, dtype=np.float32) -> np.ndarray:
    """``(depth, width, width)`` numpy weights of a WhestBench ``MLP`` (or of a sequence of its
    matrices, or of an already stacked array), validated: square, equal shapes, finite."""
    weights = getattr(mlp_or_weights, "weights", mlp_or_weights)
    Ws = (
        np.stack([np.asarray(w, dtype=dtype) for w in weights])
        if not isinstance(weights, np.ndarray)
        else weights.astype(dtype, copy=False)
    )
    if Ws.ndim != 3 or Ws.shape[0] < 1 or Ws.shape[1] != Ws.shape[2]:
        raise ValueError(f"WhestBench weights must be (depth, width, width) with depth >= 1, got {Ws.shape}")
    if not np.isfinite(Ws).all():
        raise ValueError("WhestBench weights contain NaN or Inf")
    return Ws


def whest_spec(width: int, depth: int) -> MLPSpec:
    """The cumjax spec of a WhestBench network: ``depth`` ReLU layers plus an identity output layer;
    its init has WhestBench's weight variance (fan_in * Var(W) = 2) on every ReLU layer."""
    init = Init(kind="manual", w_var=(WHEST_W_VAR,) * depth + (1.0,))
    return MLPSpec(
        input_dim=width, width=width, output_dim=width, num_layers=depth + 1, activations=("relu",) * depth, init=init
    )


def to_cumjax(mlp_or_weights, dtype=None) -> tuple[MLPSpec, Any]:
    """``(spec, params)``: Flax variables of the cumjax network equal to a WhestBench network (kernels
    ``W_l`` as stored, ``x @ W``; an identity last kernel; no biases). dtype: of the params (default:
    jax's default float)."""
    Ws = whest_weights(mlp_or_weights)
    depth, width = Ws.shape[0], Ws.shape[1]
    eye = np.eye(width, dtype=Ws.dtype)
    return whest_spec(width, depth), params_from_arrays(list(Ws) + [eye], None, dtype)


def whest_input(width: int, dtype=jnp.float32) -> Gaussian:
    """WhestBench's input distribution N(0, I)."""
    return Gaussian.standard(width, dtype)


def all_layers(params, spec: MLPSpec, x) -> jax.Array:
    """cumjax forward pass of a converted network on inputs ``x (..., width)``: the WhestBench
    post-activations ``(depth, ..., width)``."""
    out = forward(params, spec, x, all_layers=True)
    return jnp.stack([out[f"act{l}"] for l in range(spec.num_layers - 1)])


def whest_forward(mlp, x) -> np.ndarray:
    """WhestBench's own forward pass (``whestbench.run_mlp_all_layers``) on ``x (n, width)``:
    ``(depth, n, width)``, computed in the dtype of ``x`` (float64 ``x``: float64 arithmetic on the
    float32 weights)."""
    wb = require_whestbench()
    import flopscope.numpy as fnp

    return np.stack([np.asarray(a) for a in wb.run_mlp_all_layers(mlp, fnp.asarray(np.asarray(x)))])


# ----------------------------------------------------------------------------- estimation


def layer_means(Ws, config: PropagationConfig = PropagationConfig(), unroll: bool = False) -> jax.Array:
    """cumjax's estimate of every WhestBench layer mean: ``Ws (depth, width, width)`` -> ``(depth, width)``.

    Runs :func:`cumjax.propagate` on the converted network with the input N(0, I) in the dtype of
    ``Ws`` and reads the degree-1 cumulant of ``act{l}``. ``avg_metric`` uses WhestBench's weight
    variance (fan_in * Var(W) = 2 per layer). Pure and jittable (``config``/``unroll`` static)."""
    depth, width = Ws.shape[0], Ws.shape[-1]
    layers = [(Ws[l], None) for l in range(depth)] + [(jnp.eye(width, dtype=Ws.dtype), None)]
    config = dataclasses.replace(config, output_degree=1)
    out = propagate(layers, whest_spec(width, depth), whest_input(width, Ws.dtype), config, unroll=unroll)
    return jnp.stack([out.mean(f"act{l}") for l in range(depth)])


@functools.cache
def jitted_layer_means(config: PropagationConfig):
    """``jax.jit`` of :func:`layer_means` for one configuration (compiled once per shape and dtype)."""
    return jax.jit(functools.partial(layer_means, config=config))


@functools.cache
def layer_means_flops(width: int, depth: int, config: PropagationConfig, dtype=jnp.float32) -> float:
    """Analytic FLOPs of one :func:`layer_means` call as it runs (hidden layers under ``lax.scan``),
    from the shapes of the operations it executes (:func:`cumjax.flops.jaxpr_flops`; 2 per
    multiply-add, 1 per elementwise or transcendental op)."""
    Ws = jax.ShapeDtypeStruct((depth, width, width), jnp.dtype(dtype))
    return float(jaxpr_flops(functools.partial(layer_means, config=config), Ws).total)


def layer_means_xla_flops(width: int, depth: int, config: PropagationConfig, dtype=jnp.float32) -> float:
    """XLA's count (``flops + transcendentals``) of the compiled, unrolled :func:`layer_means`: the
    cross-check of :func:`layer_means_flops` (a scanned body would be counted once)."""
    Ws = jax.ShapeDtypeStruct((depth, width, width), jnp.dtype(dtype))
    cost = compiled_cost(functools.partial(layer_means, config=config, unroll=True), Ws)
    return cost["flops"] + cost["transcendentals"]


def _charge(flop_cost: int, shape, dtype):
    """A flopscope timer charging ``flop_cost`` to the active budget (so WhestBench's scorer counts
    cumjax's FLOPs and times the JAX call as counted work), or None outside a budget."""
    try:
        from flopscope._budget import get_active_budget
    except ImportError:  # pragma: no cover - a flopscope without this hook: nothing charged
        return None
    budget = get_active_budget()
    if budget is None:
        return None
    return budget.deduct(
        "cumjax.layer_means",
        flop_cost=int(flop_cost),
        subscripts=None,
        shapes=(tuple(shape),),
        dtypes=(np.dtype(dtype).name,),
    )


class _EstimatorMixin:
    """The cumjax side of :class:`CumjaxEstimator` (kept free of whestbench imports)."""

    def __init__(
        self, config: PropagationConfig = PropagationConfig(k_max=2), dtype="float32", charge_flops: bool = True
    ):
        if not isinstance(config, PropagationConfig):
            raise TypeError(f"config must be a PropagationConfig, got {type(config).__name__}")
        self.config = config
        self.dtype = np.dtype(dtype)
        self.charge_flops = charge_flops
        self.name = f"cumjax_{config.name}"

    def warmup(self, width: int, depth: int) -> None:
        """Compile for this shape (and count its FLOPs), so that predict() times only the run."""
        if self.charge_flops:
            self.flops(width, depth)
        Ws = jnp.zeros((depth, width, width), self.dtype)
        jax.block_until_ready(jitted_layer_means(self.config)(Ws))

    def flops(self, width: int, depth: int) -> float:
        return layer_means_flops(width, depth, self.config, self.dtype)

    def setup(self, context) -> None:
        self.warmup(context.width, context.depth)

    def predict_numpy(self, mlp) -> np.ndarray:
        """``(depth, width)`` numpy estimate for a WhestBench ``MLP`` (or its weights)."""
        Ws = whest_weights(mlp, self.dtype)
        fn = jitted_layer_means(self.config)
        timer = _charge(self.flops(Ws.shape[1], Ws.shape[0]), Ws.shape, self.dtype) if self.charge_flops else None
        if timer is None:
            return np.asarray(fn(jnp.asarray(Ws)))
        with timer:
            return np.asarray(fn(jnp.asarray(Ws)))

    def predict(self, mlp, budget: int):
        import flopscope.numpy as fnp

        return fnp.asarray(self.predict_numpy(mlp))


@functools.cache
def _estimator_class():
    wb = require_whestbench()

    class CumjaxEstimator(_EstimatorMixin, wb.BaseEstimator):
        """A WhestBench estimator running one cumjax :class:`PropagationConfig`.

        ``predict(mlp, budget)`` returns the ``(depth, width)`` layer means. With ``charge_flops``
        the XLA-counted FLOPs of the call are charged to the active flopscope budget (flopscope does
        not see JAX's arithmetic), so the scorer's ``flops_used`` is cumjax's own count."""

    CumjaxEstimator.__module__ = __name__
    return CumjaxEstimator


def make_estimator(config: PropagationConfig = PropagationConfig(k_max=2), dtype="float32", charge_flops: bool = True):
    """A :class:`CumjaxEstimator` (a ``whestbench.BaseEstimator``) for ``config``."""
    return _estimator_class()(config, dtype, charge_flops)


def __getattr__(name):  # ``from cumjax.whest import CumjaxEstimator`` imports whestbench only then
    if name == "CumjaxEstimator":
        return _estimator_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def baseline_flops(name: str, width: int, depth: int) -> int:
    """Analytic FLOPs (2 per multiply-add, 1 per elementwise op, transcendental ops as 1) of
    WhestBench's reference estimators, as written in ``whestbench.estimators``:

    * ``mean_propagation``: per layer ``W^T mu`` and ``(W*W)^T var`` (``4 w^2``), ``W*W`` (``w^2``)
      and about 20 elementwise ops per neuron;
    * ``covariance_propagation``: per layer ``W^T C W`` (``4 w^3``), ``W^T mu`` (``2 w^2``), the gain
      outer product and its product with the covariance (``2 w^2``) and about 20 ops per neuron."""
    per_neuron = 20 * width
    if name == "mean_propagation":
        return depth * (5 * width**2 + per_neuron)
    if name == "covariance_propagation":
        return depth * (4 * width**3 + 4 * width**2 + per_neuron)
    raise ValueError(f"no FLOP count for baseline {name!r}")


def baselines() -> dict[str, Any]:
    """WhestBench's own reference estimators: ``{"mean_propagation": ..., "covariance_propagation": ...}``."""
    require_whestbench()
    from whestbench.estimators import CovariancePropagationEstimator, MeanPropagationEstimator

    return {"mean_propagation": MeanPropagationEstimator(), "covariance_propagation": CovariancePropagationEstimator()}


__all__ = [
    "WHEST_REQUIREMENT",
    "WHEST_W_VAR",
    "all_layers",
    "baseline_flops",
    "baselines",
    "jitted_layer_means",
    "layer_means",
    "layer_means_flops",
    "layer_means_xla_flops",
    "make_estimator",
    "require_whestbench",
    "to_cumjax",
    "whest_forward",
    "whest_input",
    "whest_spec",
    "whest_weights",
]
