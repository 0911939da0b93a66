"""cumjax: cumulant propagation through wide random MLPs, in JAX.

Estimate the mean (and the low-order cumulants of every layer) of an MLP on a Gaussian input
without sampling, and compare with a jitted Monte Carlo sampler on the same parameters.
"""
from .activations import ACTIVATIONS, activation_fn, gaussian_expectation
from .diagrams import KINDS
from .flops import compiled_flops, estimator_flops
from .mlp import MLP, Init, MLPSpec, forward, init_params, layer_weights, load_golden, params_from_arrays, params_to_arrays
from .montecarlo import MCResult, forward_flops, monte_carlo, monte_carlo_batched, monte_carlo_sharded
from .propagate import PropagationConfig, RadialTensor, estimate_mean, input_tower, propagate

__all__ = [
    "ACTIVATIONS", "KINDS", "MLP", "Init", "MCResult", "MLPSpec", "PropagationConfig", "RadialTensor",
    "activation_fn", "compiled_flops", "estimate_mean", "estimator_flops", "forward", "forward_flops",
    "gaussian_expectation", "init_params", "input_tower", "layer_weights", "load_golden", "monte_carlo",
    "monte_carlo_batched", "monte_carlo_sharded", "params_from_arrays", "params_to_arrays", "propagate",
]
