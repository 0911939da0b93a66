"""FLOP counts: what XLA compiles for an estimator, and the analytic cost of sampling."""
from __future__ import annotations

import dataclasses

import jax

from .propagate import PropagationConfig, propagate


def compiled_flops(fn, *args) -> float:
    """FLOPs of ``jax.jit(fn)(*args)`` from XLA's cost analysis of the compiled program
    (matmuls at 2 per multiply-add, elementwise ops at 1; gathers and scatters count 0)."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returns one dict per device
        cost = cost[0]
    return float(cost.get("flops", 0.0))


def estimator_flops(params, activations, mean, cov, config: PropagationConfig, weight_variances=None) -> float:
    """FLOPs of one estimate of the output mean (only degree 1 passes the output layer),
    counted on the unrolled program so that every layer is included."""
    config = dataclasses.replace(config, output_degree=1)

    def run(params, mean, cov):
        out = propagate(params, activations, mean, cov, config, weight_variances, unroll=True)
        return out[f"pre{len(out) // 2}"][1].core

    return compiled_flops(run, params, mean, cov)
