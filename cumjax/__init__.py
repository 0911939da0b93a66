"""cumjax: cumulant propagation through wide random MLPs, in JAX.

Estimate the mean (and the low-order cumulants of every layer) of an MLP on a Gaussian input
without sampling, and compare with a jitted Monte Carlo sampler on the same parameters.

The public API is the list below. Topic submodules keep their own namespaces:
``cumjax.tails`` (tail probabilities through the estimator), ``cumjax.importance``
(importance-sampled tail ground truth), ``cumjax.audit`` (gradient audits), ``cumjax.train``
(training through the estimator), ``cumjax.groundtruth`` (cached, resumable Monte Carlo ground
truths), ``cumjax.flopcount`` (FLOPs of any JAX program), ``cumjax.whest`` (WhestBench adapter,
optional extra).
"""

from . import audit, flopcount, groundtruth, importance, tails, train
from .activations import (
    ACTIVATIONS,
    Activation,
    activation_fn,
    activation_names,
    gaussian_expectation,
    get_activation,
    register_activation,
)
from .advice import Advice, advise
from .config import PropagationConfig
from .cumulants import Cumulants
from .diagrams import KINDS
from .flopcount import FlopCount, compiled_cost, compiled_flops, jaxpr_flops
from .flops import estimator_flop_report, estimator_flops, forward_flops, montecarlo_flop_report
from .gaussian import Gaussian
from .groundtruth import ground_truth
from .lowrank import FactoredTensor
from .memory import estimated_bytes, factored_ranks
from .mlp import (
    MLP,
    Init,
    MLPSpec,
    forward,
    init_params,
    layer_weights,
    load_golden,
    params_from_arrays,
    params_to_arrays,
)
from .montecarlo import MCResult, monte_carlo, monte_carlo_batched, monte_carlo_sharded
from .propagation import estimate_mean, input_tower, propagate
from .radial import RadialTensor
from .scoring import compare_to_truth

__all__ = [
    # networks
    "MLP",
    "MLPSpec",
    "Init",
    "init_params",
    "forward",
    "layer_weights",
    "params_from_arrays",
    "params_to_arrays",
    "load_golden",
    # activations
    "Activation",
    "ACTIVATIONS",
    "register_activation",
    "get_activation",
    "activation_names",
    "activation_fn",
    "gaussian_expectation",
    # the estimator
    "Gaussian",
    "PropagationConfig",
    "KINDS",
    "propagate",
    "estimate_mean",
    "input_tower",
    "Cumulants",
    "RadialTensor",
    "FactoredTensor",
    "estimated_bytes",
    "factored_ranks",
    # Monte Carlo
    "monte_carlo",
    "monte_carlo_batched",
    "monte_carlo_sharded",
    "MCResult",
    "ground_truth",
    # FLOPs and scoring
    "forward_flops",
    "estimator_flops",
    "estimator_flop_report",
    "montecarlo_flop_report",
    "jaxpr_flops",
    "compiled_flops",
    "compiled_cost",
    "FlopCount",
    "compare_to_truth",
    # which estimator to use
    "advise",
    "Advice",
    # topic submodules
    "audit",
    "flopcount",
    "groundtruth",
    "importance",
    "tails",
    "train",
]
