"""FLOPs of the estimators and of Monte Carlo, counted both ways (analytic jaxpr walk and XLA's
cost analysis, :mod:`cumjax.flopcount`), side by side.

The analytic count is the one every experiment reports: it counts what the program executes
(see :func:`cumjax.flopcount.jaxpr_flops`), so "FLOPs" are executed FLOPs, never a discount for
symmetry that the code does not exploit. XLA's count is the cross-check.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .config import PropagationConfig, check_config
from .flopcount import FlopCount, compiled_cost, count_jaxpr, jaxpr_flops
from .gaussian import Gaussian
from .mlp import MLPSpec, forward
from .propagation import _accepts_legacy, propagate


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def forward_flops(spec: MLPSpec) -> int:
    """FLOPs of one forward pass (one Monte Carlo sample): per linear layer ``2 in out`` for the
    matmul, plus ``out`` for the bias if any, plus ``out`` for the activation of a hidden layer
    (one FLOP per element, whatever the nonlinearity). Sampling the input and the statistics are
    not counted."""
    total = 0
    for l, (a, b) in enumerate(zip(spec.dims[:-1], spec.dims[1:])):
        total += 2 * a * b + (b if spec.use_bias else 0) + (b if l < spec.num_layers - 1 else 0)
    return total


# ----------------------------------------------------------------------------- estimators


def _estimator_fn(spec: MLPSpec, config: PropagationConfig, unroll: bool):
    config = dataclasses.replace(check_config(config), output_degree=1)

    def run(params, gaussian):
        return propagate(params, spec, gaussian, config, unroll=unroll).mean()

    return run


@_accepts_legacy
def estimator_jaxpr_flops(
    params, spec: MLPSpec, gaussian: Gaussian, config: PropagationConfig = PropagationConfig(), *, unroll: bool = False
) -> FlopCount:
    """Analytic :class:`FlopCount` of one estimate of the output mean (only degree 1 passes the
    output layer), of the program :func:`cumjax.estimate_mean` runs (hidden layers under
    ``lax.scan``) or, with ``unroll``, of the unrolled one. The scan body computes every tracked
    degree in every step, so the scanned program also does the last hidden layer's higher-degree
    work that the unrolled program drops as dead code: a fixed amount, at most one layer's
    nonlinear step."""
    return jaxpr_flops(_estimator_fn(spec, config, unroll), params, gaussian)


@_accepts_legacy
def estimator_flops(
    params, spec: MLPSpec, gaussian: Gaussian, config: PropagationConfig = PropagationConfig()
) -> float:
    """Analytic FLOPs of one estimate of the output mean, as :func:`cumjax.estimate_mean` runs it:
    :func:`estimator_jaxpr_flops` ``.total`` (matmul + elementwise + transcendental). XLA's count
    agrees within the factor stated in :func:`estimator_flop_report`."""
    return float(estimator_jaxpr_flops(params, spec, gaussian, config).total)


@_accepts_legacy
def estimator_flop_report(
    params, spec: MLPSpec, gaussian: Gaussian, config: PropagationConfig = PropagationConfig()
) -> dict:
    """Both counts of one estimate of the output mean.

    ``analytic``: :func:`estimator_flops` (the scanned program), with its ``analytic_matmul`` /
    ``analytic_elementwise`` / ``analytic_transcendental`` split; ``analytic_unrolled``: the same
    count on the unrolled program; ``xla``: XLA's cost analysis of the compiled unrolled program
    (its ``flops`` plus ``transcendentals``); ``ratio``: analytic_unrolled / xla, the like-for-like
    comparison; ``matmul_ratio``: the same for the matmul parts (``xla_matmul``: the dots of the
    optimized HLO); ``ratio_loops_once`` / ``matmul_ratio_loops_once``: analytic with every loop
    body counted once, XLA's convention, over xla (where the program loops, XLA counts one
    iteration and ``ratio`` exceeds 1). The measured ratios are in the README
    (``experiments/bench_flops.py``).
    """
    count = estimator_jaxpr_flops(params, spec, gaussian, config)
    fn = _estimator_fn(spec, config, True)
    closed = jax.make_jaxpr(fn)(params, gaussian)
    unrolled, once = count_jaxpr(closed), count_jaxpr(closed, loops_once=True)
    xla = compiled_cost(fn, params, gaussian)
    xla_total = xla["flops"] + xla["transcendentals"]
    return dict(
        analytic=float(count.total),
        **{f"analytic_{k}": v for k, v in count.as_dict().items() if k != "total"},
        analytic_unrolled=float(unrolled.total),
        analytic_unrolled_matmul=float(unrolled.matmul),
        xla=xla_total,
        xla_flops=xla["flops"],
        xla_transcendentals=xla["transcendentals"],
        xla_matmul=xla["matmul"],
        ratio=_ratio(unrolled.total, xla_total),
        matmul_ratio=_ratio(unrolled.matmul, xla["matmul"]),
        ratio_loops_once=_ratio(once.total, xla_total),
        matmul_ratio_loops_once=_ratio(once.matmul, xla["matmul"]),
    )


# ----------------------------------------------------------------------------- Monte Carlo


def _mc_fn(spec, gaussian, num_samples: int, chunk: int, dtype):
    from .montecarlo import monte_carlo

    def run(key, params):
        return monte_carlo(key, params, spec, gaussian, num_samples, chunk_size=chunk, dtype=dtype)

    return run


def montecarlo_flop_report(
    params, spec: MLPSpec, gaussian: Gaussian | None = None, chunk_size: int = 1024, dtype=jnp.float32
) -> dict:
    """Per-sample FLOPs of Monte Carlo several ways:

    * ``analytic``: :func:`forward_flops` (the forward pass only);
    * ``forward_jaxpr``: the jaxpr count of :func:`cumjax.forward` on a batch, per row;
    * ``chunk_jaxpr``: the jaxpr count of one chunk of :func:`cumjax.monte_carlo` (sampling the
      input, forward pass, statistics and merge) per sample: the count at two chunks minus the
      count at one chunk (fixed costs cancel), over ``chunk_size``;
    * ``chunk_xla``: XLA's count of :func:`cumjax.monte_carlo` on exactly one chunk, per sample.

    ``ratio_*`` are each over ``analytic``; ``ratio`` is chunk_jaxpr / chunk_xla (like for like).
    The chunk counts exceed the forward pass by the sampling and statistics work,
    O(input_dim + sum of layer widths) per sample; XLA counts more of it (the threefry integer
    hashing, erf_inv as a ~37-FLOP polynomial).
    """
    d = spec.input_dim
    gaussian = Gaussian.standard(d, dtype) if gaussian is None else gaussian
    key = jax.random.PRNGKey(0)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)
    analytic = forward_flops(spec)
    x = jax.ShapeDtypeStruct((chunk_size, d), dtype)
    fwd = jaxpr_flops(lambda p, x: forward(p, spec, x), params, x)
    one = jaxpr_flops(_mc_fn(spec, gaussian, chunk_size, chunk_size, dtype), key, params)
    two = jaxpr_flops(_mc_fn(spec, gaussian, 2 * chunk_size, chunk_size, dtype), key, params)
    chunk = (two.total - one.total) / chunk_size
    xla = compiled_cost(_mc_fn(spec, gaussian, chunk_size, chunk_size, dtype), key, params)
    xla_per = (xla["flops"] + xla["transcendentals"]) / chunk_size
    return dict(
        analytic=float(analytic),
        forward_jaxpr=fwd.total / chunk_size,
        chunk_jaxpr=chunk,
        chunk_xla=xla_per,
        chunk_size=chunk_size,
        ratio_forward_jaxpr=_ratio(fwd.total / chunk_size, analytic),
        ratio_chunk_jaxpr=_ratio(chunk, analytic),
        ratio_chunk_xla=_ratio(xla_per, analytic),
        ratio=_ratio(chunk, xla_per),
        uncounted=sorted(set(fwd.uncounted) | set(one.uncounted)),
    )
