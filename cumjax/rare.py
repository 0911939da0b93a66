"""Rare events and audits: tail probabilities of neurons through the estimator, their sampled
ground truth (plain and importance-sampled), and gradient tools for auditing networks.

Tail probabilities (as in the paper): for ``z = pre{layer}`` of an MLP, ``P(z_i > t)`` is the mean
output of the *thresholded network*: the layers up to ``layer`` with bias ``b - t``, a heaviside
nonlinearity, and a fixed 0/1 selection layer ``(n, m)`` as output, so its output is the indicator
``1[z_i > t]`` of the selected neurons and cumulant propagation estimates its mean.

Ground truth for tiny probabilities: importance sampling by exponential tilting of the input
Gaussian. With ``x = mean + F e`` (``F F^T = cov``), draw ``e ~ N(mu, I)`` instead of ``N(0, I)`` and
weight each sample by the likelihood ratio ``exp(-mu.e + |mu|^2 / 2)``: unbiased for every ``mu``,
efficient when ``mu`` sits where the event lives. ``mu`` per (neuron, threshold) is fitted by the
cross-entropy method: ``mu <- E_w[e | z_i >= gamma]`` with an increasing level ``gamma`` (a quantile
of the current proposal, capped at ``t``), which converges to the Gaussian mean shift closest in KL
to the zero-variance proposal ``N(0, I) | {z_i > t}``. The standard error comes from the spread of
the weighted indicators; validate against plain sampling where that resolves the probability.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from .flops import compiled_flops
from .mlp import HIGHEST, MLPSpec, forward, layer_weights, params_from_arrays
from .montecarlo import _input_factor, default_chunk_size
from .propagate import PropagationConfig, estimate_mean, propagate

Array = jax.Array


# ----------------------------------------------------------------------------- networks


def _check_layer(num_layers: int, layer: int) -> None:
    if not isinstance(layer, (int, np.integer)) or not 0 <= layer < num_layers:
        raise ValueError(f"layer must be an int in [0, {num_layers}), got {layer!r}")


def truncated_spec(spec: MLPSpec, layer: int) -> MLPSpec:
    """The network up to linear layer ``layer``: its output is ``z = pre{layer}``."""
    _check_layer(spec.num_layers, layer)
    hidden = spec.dims[1:layer + 1]
    width = hidden[0] if hidden else spec.dims[layer + 1]
    return MLPSpec(spec.input_dim, width, spec.dims[layer + 1], layer + 1, spec.activations[:layer], spec.use_bias)


def truncated_params(params, layer: int):
    """Flax variables of the layers ``0..layer`` (pure: pytree in, pytree out)."""
    layers = layer_weights(params)
    _check_layer(len(layers), layer)
    return {"params": {f"layer{l}": _layer_dict(W, b) for l, (W, b) in enumerate(layers[:layer + 1])}}


def _layer_dict(W, b):
    return {"kernel": W} | ({} if b is None else {"bias": b})


def thresholded_spec(spec: MLPSpec, layer: int, num_outputs: int | None = None) -> MLPSpec:
    """Spec of the thresholded network for ``z = pre{layer}`` (see the module docstring): ReLU part,
    heaviside on ``z - t``, selection output of ``num_outputs`` neurons (default: all of ``z``).
    ``z`` must have the hidden width (every hidden layer of an :class:`MLPSpec` has one width)."""
    trunc = truncated_spec(spec, layer)
    if trunc.output_dim != trunc.width:
        raise ValueError(f"pre{layer} has {trunc.output_dim} units but the hidden width is {trunc.width}; "
                         f"threshold a hidden layer (or a net whose output has the hidden width)")
    m = trunc.output_dim if num_outputs is None else int(num_outputs)
    return MLPSpec(spec.input_dim, trunc.width, m, layer + 2, trunc.activations + ("heaviside",), use_bias=True)


def threshold_params(params, layer: int, threshold, neurons: Sequence[int] | None = None):
    """Flax variables of the thresholded network whose output is ``1[z_i > t_i]`` for ``z = pre{layer}``.

    params: the original network's variables; threshold: ``()`` or ``(n,)`` (per neuron of ``z``),
    traced or concrete; neurons: static indices of the ``m`` output units (default all ``n``).
    Every layer gets a bias (zeros where the original has none) so that the result matches
    ``MLP(thresholded_spec(...))``. Pure; differentiable in ``params`` and ``threshold``."""
    layers = layer_weights(params)
    _check_layer(len(layers), layer)
    Ws, bs = [], []
    for l, (W, b) in enumerate(layers[:layer + 1]):
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


def tail_probabilities(params, activations: Sequence[str], mean, cov, layer: int, thresholds,
                       config: PropagationConfig = PropagationConfig(), neurons: Sequence[int] | None = None,
                       weight_variances: Sequence[float] | None = None, unroll: bool = False) -> Array:
    """Estimated ``P(z_i > t)`` for ``z = pre{layer}``: ``(T, m)`` for ``thresholds (T,)`` or ``(T, n)``.

    activations: the original network's hidden nonlinearities (those after ``layer`` are unused).
    One estimator run per threshold, vmapped: only the heaviside step and the output depend on the
    threshold, so the layers before it are computed once. Jittable (``layer``, ``config``,
    ``neurons`` static) and differentiable in ``params``."""
    acts = tuple(activations[:layer]) + ("heaviside",)
    wv = None if weight_variances is None else tuple(weight_variances[:layer + 1]) + (1.0,)
    cfg = dataclasses.replace(config, output_degree=1)

    def one(t):
        p = threshold_params(params, layer, t, neurons)
        return propagate(p, acts, mean, cov, cfg, wv, unroll=unroll)[f"pre{layer + 1}"][1].core

    thresholds = jnp.asarray(thresholds)
    if thresholds.ndim not in (1, 2):
        raise ValueError(f"thresholds must have shape (T,) or (T, n), got {thresholds.shape}")
    return jax.vmap(one)(thresholds)


def tail_flops(params, activations, mean, cov, layer, thresholds, config=PropagationConfig(), neurons=None,
               weight_variances=None) -> float:
    """XLA's FLOP count of :func:`tail_probabilities` for all thresholds (unrolled, so every layer counts)."""
    fn = lambda p, m, c, t: tail_probabilities(p, activations, m, c, layer, t, config, neurons, weight_variances, True)  # noqa: E731
    return compiled_flops(fn, params, mean, cov, jnp.asarray(thresholds))


def sample_flops(spec: MLPSpec, layer: int, num_thresholds: int) -> int:
    """FLOPs per Monte Carlo sample of every tail indicator: the forward pass up to ``z`` (see
    :func:`cumjax.forward_flops`) plus one comparison per (threshold, neuron)."""
    from .montecarlo import forward_flops

    trunc = truncated_spec(spec, layer)
    return forward_flops(trunc) + num_thresholds * trunc.output_dim


# ----------------------------------------------------------------------------- sampling


@dataclasses.dataclass(frozen=True)
class TailEstimate:
    """Sampled tail probabilities: ``mean`` and standard error ``sem`` (same shape), ``num_samples``."""

    mean: np.ndarray
    sem: np.ndarray
    num_samples: int


def _acc():
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


@functools.partial(jax.jit, static_argnames=("spec", "num_samples", "chunk"))
def _tail_sums(key, params, mean, factor, shift, thresholds, *, spec, num_samples, chunk):
    """Sums over ``num_samples`` draws ``e ~ N(shift, I)`` of ``w 1[z > t]`` and ``w^2 1[z > t]``,
    ``(T, n)`` each, with ``w`` the likelihood ratio to ``N(0, I)`` and ``x = mean + F e``."""
    acc, d = _acc(), mean.shape[0]
    num_chunks = -(-num_samples // chunk)
    half_sq = 0.5 * jnp.sum(shift.astype(acc) ** 2)

    def body(carry, c):
        e = jax.random.normal(jax.random.fold_in(key, c), (chunk, d), mean.dtype) + shift
        x = mean + (e if factor is None else jnp.matmul(e, factor.T, precision=HIGHEST))
        z = forward(params, spec, x)
        w = jnp.exp(half_sq - e.astype(acc) @ shift.astype(acc))
        w = jnp.where(c * chunk + jnp.arange(chunk) < num_samples, w, 0.0)
        hit = (z[:, None, :] > thresholds[None]).astype(acc)
        s1, s2 = carry
        return (s1 + jnp.einsum("c,ctn->tn", w, hit), s2 + jnp.einsum("c,ctn->tn", w * w, hit)), None

    zeros = jnp.zeros(thresholds.shape, acc)
    (s1, s2), _ = jax.lax.scan(body, (zeros, zeros), jnp.arange(num_chunks))
    return s1, s2


def _moments(s1, s2, n):
    mean = s1 / n
    var = jnp.maximum(s2 / n - mean**2, 0.0) * n / (n - 1)
    return mean, jnp.sqrt(var / n)


def _prepare_sampling(params, spec, layer, mean, cov, dtype):
    trunc = truncated_spec(spec, layer)
    tp = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), truncated_params(params, layer))
    identity = np.array_equal(np.asarray(cov), np.eye(np.shape(cov)[0]))
    factor = None if identity else _input_factor(jnp.asarray(cov, jnp.result_type(float)), dtype)
    return trunc, tp, jnp.asarray(mean, dtype), factor


def _check_samples(num_samples, chunk):
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")
    chunk = default_chunk_size() if chunk is None else int(chunk)
    return int(num_samples), max(1, min(chunk, int(num_samples)))


def tail_monte_carlo(key, params, spec: MLPSpec, mean, cov, layer: int, thresholds, num_samples: int,
                     chunk_size: int | None = None, dtype=jnp.float32) -> TailEstimate:
    """Plain Monte Carlo of ``P(z_i > t)`` for ``z = pre{layer}``: every threshold row ``(T, n)``
    (or ``(T,)``, the same for all neurons) and neuron from the same ``num_samples`` inputs.
    Returns ``(T, n)`` estimates and standard errors ``sqrt(p (1 - p) / N)`` (sample version)."""
    num_samples, chunk = _check_samples(num_samples, chunk_size)
    trunc, tp, mean, factor = _prepare_sampling(params, spec, layer, mean, cov, dtype)
    t = jnp.broadcast_to(jnp.asarray(thresholds, dtype).reshape(len(thresholds), -1), (len(thresholds), trunc.output_dim))
    s1, s2 = _tail_sums(key, tp, mean, factor, jnp.zeros(mean.shape, dtype), t, spec=trunc, num_samples=num_samples, chunk=chunk)
    m, se = _moments(s1, s2, num_samples)
    return TailEstimate(np.asarray(m), np.asarray(se), num_samples)


@functools.partial(jax.jit, static_argnames=("spec", "num_samples", "iterations", "rho"))
def _cross_entropy_shift(key, params, mean, factor, neuron, threshold, *, spec, num_samples, iterations, rho):
    acc, d = _acc(), mean.shape[0]
    n_elite = max(1, int(math.ceil(rho * num_samples)))

    def step(mu, k):
        e = jax.random.normal(k, (num_samples, d), mean.dtype) + mu
        x = mean + (e if factor is None else jnp.matmul(e, factor.T, precision=HIGHEST))
        z = forward(params, spec, x)[:, neuron]
        gamma = jnp.minimum(threshold, jax.lax.top_k(z, n_elite)[0][-1])  # the (1 - rho) quantile, capped at t
        logw = jnp.where(z >= gamma, -e.astype(acc) @ mu.astype(acc), -jnp.inf)
        w = jnp.exp(logw - jnp.max(logw))  # likelihood ratios up to a constant that cancels
        return (w @ e.astype(acc) / jnp.sum(w)).astype(mean.dtype), gamma

    mu, levels = jax.lax.scan(step, jnp.zeros(d, mean.dtype), jax.random.split(key, iterations))
    return mu, levels


def tail_importance_sampling(key, params, spec: MLPSpec, mean, cov, layer: int, neurons, thresholds, num_samples: int,
                             ce_samples: int = 4096, ce_iterations: int = 8, ce_rho: float = 0.1,
                             chunk_size: int | None = None, dtype=jnp.float32) -> tuple[TailEstimate, np.ndarray]:
    """Importance-sampled ``P(z_i > t)`` for P pairs ``(neurons[p], thresholds[p])``, ``z = pre{layer}``.

    Per pair: ``ce_iterations`` cross-entropy steps of ``ce_samples`` draws fit the mean shift (in
    whitened input space), then ``num_samples`` fresh draws from the shifted Gaussian give the
    likelihood-ratio-weighted estimate and its standard error (module docstring). Pairs use
    independent keys. Returns ``(TailEstimate with (P,) arrays, shifts (P, d))``."""
    num_samples, chunk = _check_samples(num_samples, chunk_size)
    neurons, thresholds = np.asarray(neurons, int).reshape(-1), np.asarray(thresholds, float).reshape(-1)
    if neurons.shape != thresholds.shape:
        raise ValueError(f"need one threshold per neuron index, got {neurons.shape} and {thresholds.shape}")
    if not 0 < ce_rho < 1 or ce_iterations < 1 or ce_samples < 2:
        raise ValueError("need 0 < ce_rho < 1, ce_iterations >= 1, ce_samples >= 2")
    trunc, tp, mean, factor = _prepare_sampling(params, spec, layer, mean, cov, dtype)
    n = trunc.output_dim
    if neurons.min() < 0 or neurons.max() >= n:
        raise ValueError(f"neuron indices must lie in [0, {n})")
    keys = jax.random.split(key, 2 * len(neurons)).reshape(len(neurons), 2, -1)
    ests, sems, shifts = [], [], []
    for p, (i, t) in enumerate(zip(neurons, thresholds)):  # one compiled program, reused for every pair
        mu, _ = _cross_entropy_shift(keys[p, 0], tp, mean, factor, int(i), jnp.asarray(t, dtype), spec=trunc,
                                     num_samples=int(ce_samples), iterations=int(ce_iterations), rho=float(ce_rho))
        row = jnp.full((1, n), jnp.inf, dtype).at[0, i].set(t)  # only this pair's indicator
        s1, s2 = _tail_sums(keys[p, 1], tp, mean, factor, mu, row, spec=trunc, num_samples=num_samples, chunk=chunk)
        m, se = _moments(s1[0, i], s2[0, i], num_samples)
        ests.append(float(m)), sems.append(float(se)), shifts.append(np.asarray(mu))
    return TailEstimate(np.array(ests), np.array(sems), num_samples), np.stack(shifts)


# ----------------------------------------------------------------------------- auditing


def relative_norm(delta, params) -> Array:
    """``||delta||_F / ||params||_F`` over the leaves of ``delta`` (matching leaves of ``params``)."""
    num = sum(jnp.sum(d**2) for d in jax.tree_util.tree_leaves(delta))
    den = sum(jnp.sum(p**2) for p in jax.tree_util.tree_leaves(params))
    return jnp.sqrt(num / den)


@dataclasses.dataclass(frozen=True)
class PerturbationResult:
    """``kernels``: perturbed kernels ``[W_l + delta_l]``; ``relative_norm``: ``||delta|| / ||W||``
    (Frobenius over all kernels); ``value``: the objective there; ``history``: per step
    ``(relative norm, objective)``; ``scale``: the factor the final line search put on delta."""

    kernels: list
    relative_norm: float
    value: float
    history: list
    scale: float


def minimal_perturbation(objective: Callable[[list], Array], kernels: Sequence[Array], target: float,
                         steps: int = 300, learning_rate: float = 0.01, penalty: float = 100.0, margin: float = 0.05,
                         bisection_steps: int = 40) -> PerturbationResult:
    """Smallest kernel perturbation (relative Frobenius norm) found by gradients that lifts
    ``objective(kernels)`` (e.g. an estimated tail probability) to ``>= target``.

    Minimises ``rel^2 + penalty * relu(log(target) + margin - log(objective))^2`` with optax Adam,
    where ``delta_l = rms(W_l) u_l`` so that every layer's step is relative to its scale; then a
    bisection along the found ``delta`` takes the smallest multiple that still meets the target.
    Only ``objective``'s gradients are used (no samples if it is a cumulant estimate)."""
    kernels = [jnp.asarray(W) for W in kernels]
    scales = [jnp.sqrt(jnp.mean(W**2)) for W in kernels]
    log_target = math.log(target)

    def deltas(u):
        return [s * x for s, x in zip(scales, u)]

    def perturbed(u, c=1.0):
        return [W + c * d for W, d in zip(kernels, deltas(u))]

    def loss(u):
        value = objective(perturbed(u))
        short = jax.nn.relu(log_target + margin - jnp.log(jnp.maximum(value, 1e-300)))
        return relative_norm(deltas(u), kernels) ** 2 + penalty * short**2, value

    opt = optax.adam(learning_rate)
    u = [jnp.zeros_like(W) for W in kernels]
    state = opt.init(u)

    @jax.jit
    def update(u, state):
        (_, value), g = jax.value_and_grad(loss, has_aux=True)(u)
        step, state = opt.update(g, state, u)
        return optax.apply_updates(u, step), state, value, relative_norm(deltas(u), kernels)

    history = []
    for _ in range(steps):
        u, state, value, rel = update(u, state)
        history.append((float(rel), float(value)))
    value_at = jax.jit(lambda c: objective(perturbed(u, c)))
    lo, hi = 0.0, 1.0
    while float(value_at(hi)) < target:  # the penalty leaves the end just short of the target: extend
        hi *= 2
        if hi > 64:
            raise RuntimeError(f"no multiple of the found perturbation reaches the target {target}")
    if float(value_at(0.0)) >= target:
        hi = 0.0
    for _ in range(bisection_steps if hi > 0 else 0):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if float(value_at(mid)) >= target else (mid, hi)
    final = perturbed(u, hi)
    rel = float(relative_norm([f - W for f, W in zip(final, kernels)], kernels))
    return PerturbationResult(final, rel, float(value_at(hi)), history, hi)


def replace_kernels(params, kernels: Sequence[Array]):
    """``params`` with the kernels of its first ``len(kernels)`` layers replaced (biases kept)."""
    layers = layer_weights(params)
    Ws = list(kernels) + [W for W, _ in layers[len(kernels):]]
    return {"params": {f"layer{l}": _layer_dict(W, b) for l, (W, (_, b)) in enumerate(zip(Ws, layers))}}


@dataclasses.dataclass(frozen=True)
class PathwiseGradient:
    """Monte Carlo gradient of ``E[c . f(x)]`` w.r.t. the params: ``mean`` and ``sem`` (pytrees like
    params), ``probe``: flat indices (K,) into ``ravel_pytree(params)`` and ``probe_cov`` (K, K),
    the covariance of the mean gradient at those coordinates (sample covariance / N)."""

    mean: dict
    sem: dict
    probe: np.ndarray
    probe_cov: np.ndarray
    num_samples: int


def pathwise_gradient(key, params, spec: MLPSpec, mean, cov, output_weights, num_samples: int, probe=(),
                      chunk_size: int = 1024, dtype=None) -> PathwiseGradient:
    """Pathwise (reparameterisation) Monte Carlo estimate of ``d E[output_weights . f(x)] / d params``
    over ``x ~ N(mean, cov)``: the sample mean of per-sample gradients, with standard errors from
    their spread and the full covariance at the flat ``probe`` coordinates (for a chi-square test).
    Unbiased wherever ``f`` is differentiable almost everywhere (ReLU nets: yes)."""
    num_samples, chunk = _check_samples(num_samples, chunk_size)
    dtype = dtype or jnp.result_type(*jax.tree_util.tree_leaves(params))
    flat, unravel = ravel_pytree(jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params))
    mean = jnp.asarray(mean, dtype)
    identity = np.array_equal(np.asarray(cov), np.eye(np.shape(cov)[0]))
    factor = None if identity else _input_factor(jnp.asarray(cov, jnp.result_type(float)), dtype)
    c_out = jnp.asarray(output_weights, dtype)
    probe = np.asarray(probe, int).reshape(-1)
    grads = _pathwise(key, flat, mean, factor, c_out, jnp.asarray(probe), unravel=unravel, spec=spec,
                      num_samples=num_samples, chunk=chunk)
    g_mean, m2, cross = grads
    var = m2 / (num_samples - 1)
    sem = jnp.sqrt(var / num_samples)
    return PathwiseGradient(unravel(g_mean), unravel(sem), probe, np.asarray(cross / (num_samples - 1) / num_samples),
                            num_samples)


@functools.partial(jax.jit, static_argnames=("unravel", "spec", "num_samples", "chunk"))
def _pathwise(key, flat, mean, factor, c_out, probe, *, unravel, spec, num_samples, chunk):
    acc, d = _acc(), mean.shape[0]
    num_chunks = -(-num_samples // chunk)
    per_sample = jax.vmap(jax.grad(lambda th, x: forward(unravel(th), spec, x) @ c_out), in_axes=(None, 0))

    def body(carry, c):
        count, mu, m2, cross = carry
        e = jax.random.normal(jax.random.fold_in(key, c), (chunk, d), mean.dtype)
        x = mean + (e if factor is None else jnp.matmul(e, factor.T, precision=HIGHEST))
        valid = (c * chunk + jnp.arange(chunk) < num_samples).astype(acc)
        g = per_sample(flat, x).astype(acc)  # (chunk, P)
        n_b = jnp.sum(valid)
        mu_b = valid @ g / n_b
        dev = (g - mu_b) * valid[:, None]
        m2_b = jnp.sum(dev**2, axis=0)
        cross_b = dev[:, probe].T @ dev[:, probe]
        # Chan et al.'s merge of (count, mean, M2) and of the probe block of the co-moment matrix
        n = count + n_b
        delta = mu_b - mu
        mu = mu + delta * n_b / n
        m2 = m2 + m2_b + delta**2 * count * n_b / n
        dp = delta[probe]
        cross = cross + cross_b + jnp.outer(dp, dp) * count * n_b / n
        return (n, mu, m2, cross), None

    P, K = flat.shape[0], probe.shape[0]
    init = (jnp.zeros((), acc), jnp.zeros(P, acc), jnp.zeros(P, acc), jnp.zeros((K, K), acc))
    (_, mu, m2, cross), _ = jax.lax.scan(body, init, jnp.arange(num_chunks))
    return mu, m2, cross


def hotelling_test(estimate, sampled_mean, mean_cov, num_samples: int) -> dict:
    """Is ``estimate (K,)`` consistent with a sampled mean ``(K,)`` whose covariance is ``mean_cov``?
    Hotelling's T^2 = d^T C^-1 d; ``(N - K) / (K (N - 1)) T^2 ~ F(K, N - K)`` under equality."""
    from scipy import stats

    d = np.asarray(sampled_mean, float) - np.asarray(estimate, float)
    K, N = d.size, int(num_samples)
    t2 = float(d @ np.linalg.solve(np.asarray(mean_cov, float), d))
    f = (N - K) / (K * (N - 1)) * t2
    return dict(t2=t2, dof=K, f=f, p_value=float(stats.f.sf(f, K, N - K)))


def estimate_gradient(params, activations, mean, cov, config: PropagationConfig, output_weights,
                      weight_variances=None):
    """``d (output_weights . estimate_mean) / d params`` through the cumulant estimator (a pytree)."""
    c = jnp.asarray(output_weights)
    return jax.grad(lambda p: estimate_mean(p, activations, mean, cov, config, weight_variances) @ c)(params)
