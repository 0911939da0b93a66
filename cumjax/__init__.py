"""cumjax: cumulant propagation through wide random MLPs, in JAX.

Estimate the mean (and the low-order cumulants of every layer) of an MLP on a Gaussian input
without sampling, and compare with a jitted Monte Carlo sampler on the same parameters.
Submodules with their own namespaces: ``cumjax.rare`` (tail probabilities, audits),
``cumjax.train`` (training through the estimator), ``cumjax.groundtruth`` (cached Monte Carlo
ground truths), ``cumjax.whest`` (WhestBench adapter, optional extra), ``cumjax.results``.
"""
from . import groundtruth, rare, results, train
from .activations import ACTIVATIONS, activation_fn, gaussian_expectation
from .diagrams import KINDS
from .factored import FactoredTensor
from .flops import (FlopCount, compiled_cost, compiled_flops, estimator_flop_report, estimator_flops, jaxpr_flops,
                    montecarlo_flop_report)
from .groundtruth import ground_truth
from .mlp import MLP, Init, MLPSpec, forward, init_params, layer_weights, load_golden, params_from_arrays, params_to_arrays
from .montecarlo import MCResult, forward_flops, monte_carlo, monte_carlo_batched, monte_carlo_sharded
from .propagate import PropagationConfig, RadialTensor, estimate_mean, input_tower, propagate

__all__ = [
    "ACTIVATIONS", "KINDS", "MLP", "FactoredTensor", "FlopCount", "Init", "MCResult", "MLPSpec", "PropagationConfig", "RadialTensor",
    "activation_fn", "compiled_cost", "compiled_flops", "estimate_mean", "estimator_flop_report", "estimator_flops",
    "forward", "forward_flops", "gaussian_expectation", "ground_truth", "groundtruth", "init_params", "input_tower",
    "jaxpr_flops", "layer_weights", "load_golden", "monte_carlo", "monte_carlo_batched", "monte_carlo_sharded",
    "montecarlo_flop_report", "params_from_arrays", "params_to_arrays", "propagate", "rare", "results", "train",
]
