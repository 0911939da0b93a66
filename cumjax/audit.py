"""Auditing networks with gradients: the smallest weight change that makes an estimated quantity
(e.g. a tail probability) reach a target, estimator gradients, and their sampled (pathwise)
counterparts with a Hotelling test of agreement."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from . import _sampling as smp
from .config import PropagationConfig
from .gaussian import Gaussian, check_gaussian
from .mlp import MLPSpec, forward, layer_weights, validate_params
from .propagation import estimate_mean

Array = jax.Array


def relative_norm(delta, params, squared: bool = False) -> Array:
    """``||delta||_F / ||params||_F`` over the leaves of ``delta`` (matching leaves of ``params``);
    its square with ``squared`` (differentiable at ``delta = 0``, where the norm is not)."""
    num = sum(jnp.sum(d**2) for d in jax.tree_util.tree_leaves(delta))
    den = sum(jnp.sum(p**2) for p in jax.tree_util.tree_leaves(params))
    return num / den if squared else jnp.sqrt(num / den)


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


def minimal_perturbation(
    objective: Callable[[list], Array],
    kernels: Sequence[Array],
    target: float,
    steps: int = 300,
    learning_rate: float = 0.01,
    penalty: float = 100.0,
    margin: float = 0.05,
    polish_steps: int = 8,
    bisection_steps: int = 40,
) -> PerturbationResult:
    """Smallest kernel perturbation (relative Frobenius norm) found by gradients that lifts
    ``objective(kernels)`` (e.g. an estimated tail probability) to ``>= target``.

    1. optax Adam (cosine-decayed step) on ``rel^2 + penalty * relu(log(target) + margin -
       log(objective))^2``, with ``delta_l = rms(W_l) u_l`` so every layer's step is relative to
       its scale;
    2. ``polish_steps`` fixed-point steps on the optimality condition of the constrained problem
       (``delta`` parallel to the objective's gradient at ``W + delta``): ``delta <- c grad``, each
       kept only if it lowers the norm while meeting the target;
    3. ``c`` always by bisection: the smallest multiple of the direction that meets the target.
    Only ``objective``'s gradients are used (no samples if it is a cumulant estimate)."""
    kernels = [jnp.asarray(W) for W in kernels]
    scales = [jnp.sqrt(jnp.mean(W**2)) for W in kernels]
    log_target = math.log(target)

    def deltas(u):
        return [s * x for s, x in zip(scales, u)]

    def loss(u):
        value = objective([W + d for W, d in zip(kernels, deltas(u))])
        short = jax.nn.relu(log_target + margin - jnp.log(jnp.maximum(value, 1e-300)))
        return relative_norm(deltas(u), kernels, squared=True) + penalty * short**2, value

    opt = optax.adam(optax.cosine_decay_schedule(learning_rate, max(steps, 1)))
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

    value_at = jax.jit(lambda d, c: objective([W + c * x for W, x in zip(kernels, d)]))
    grad_at = jax.jit(jax.grad(lambda d: objective([W + x for W, x in zip(kernels, d)])))

    def smallest_multiple(d):
        """Smallest c >= 0 with value(c d) >= target (bisection), or None."""
        hi = 1.0
        while float(value_at(d, hi)) < target:
            hi *= 2
            if hi > 64:
                return None
        lo = 0.0
        for _ in range(bisection_steps):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if float(value_at(d, mid)) >= target else (mid, hi)
        return hi

    if float(value_at([jnp.zeros_like(W) for W in kernels], 0.0)) >= target:
        return PerturbationResult(kernels, 0.0, float(objective(kernels)), history, 0.0)
    delta = deltas(u)
    scale = smallest_multiple(delta)
    if scale is None:
        raise RuntimeError(f"no multiple of the found perturbation reaches the target {target}")
    delta = [scale * d for d in delta]
    best = float(relative_norm(delta, kernels))
    for _ in range(polish_steps):
        g = grad_at(delta)
        c = smallest_multiple(g)
        if c is None:
            break
        cand = [c * x for x in g]
        rel = float(relative_norm(cand, kernels))
        if rel >= best * (1 - 1e-6):
            break
        delta, best = cand, rel
        history.append((rel, float(value_at(delta, 1.0))))
    final = [W + d for W, d in zip(kernels, delta)]
    return PerturbationResult(final, best, float(objective(final)), history, scale)


def replace_kernels(params, kernels: Sequence[Array]):
    """``params`` with the kernels of its first ``len(kernels)`` layers replaced (biases kept)."""
    layers = layer_weights(params)
    Ws = list(kernels) + [W for W, _ in layers[len(kernels) :]]
    return {
        "params": {
            f"layer{l}": {"kernel": W} | ({} if b is None else {"bias": b})
            for l, (W, (_, b)) in enumerate(zip(Ws, layers))
        }
    }


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


def pathwise_gradient(
    key,
    params,
    spec: MLPSpec,
    gaussian: Gaussian,
    output_weights,
    num_samples: int,
    probe=(),
    chunk_size: int = 1024,
    dtype=None,
) -> PathwiseGradient:
    """Pathwise (reparameterisation) Monte Carlo estimate of ``d E[output_weights . f(x)] / d params``
    over ``x ~ N(mean, cov)``: the sample mean of per-sample gradients, with standard errors from
    their spread and the full covariance at the flat ``probe`` coordinates (for a chi-square test).
    Unbiased wherever ``f`` is differentiable almost everywhere (ReLU nets: yes)."""
    num_samples = smp.check_num_samples(num_samples)
    chunk = smp.check_chunk_size(chunk_size, num_samples)
    validate_params(params, spec)
    check_gaussian(gaussian, spec.input_dim)
    dtype = dtype or jnp.result_type(*jax.tree_util.tree_leaves(params))
    flat, unravel = ravel_pytree(jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params))
    mean, factor = smp.whitened(gaussian, dtype)
    c_out = jnp.asarray(output_weights, dtype)
    probe = np.asarray(probe, int).reshape(-1)
    grads = _pathwise(
        key,
        flat,
        mean,
        factor,
        c_out,
        jnp.asarray(probe),
        unravel=unravel,
        spec=spec,
        num_samples=num_samples,
        chunk=chunk,
    )
    g_mean, m2, cross = grads
    var = m2 / (num_samples - 1)
    sem = jnp.sqrt(var / num_samples)
    return PathwiseGradient(
        unravel(g_mean), unravel(sem), probe, np.asarray(cross / (num_samples - 1) / num_samples), num_samples
    )


@functools.partial(jax.jit, static_argnames=("unravel", "spec", "num_samples", "chunk"))
def _pathwise(key, flat, mean, factor, c_out, probe, *, unravel, spec, num_samples, chunk):
    acc, d = smp.accumulation_dtype(), mean.shape[0]
    num_chunks = -(-num_samples // chunk)
    per_sample = jax.vmap(jax.grad(lambda th, x: forward(unravel(th), spec, x) @ c_out), in_axes=(None, 0))

    def body(carry, c):
        count, mu, m2, cross = carry
        e = jax.random.normal(jax.random.fold_in(key, c), (chunk, d), mean.dtype)
        x = smp.to_inputs(e, mean, factor)
        valid = (c * chunk + jnp.arange(chunk) < num_samples).astype(acc)
        g = per_sample(flat, x).astype(acc)  # (chunk, P)
        n_b = jnp.sum(valid)
        mu_b = valid @ g / n_b
        dev = (g - mu_b) * valid[:, None]
        m2_b = jnp.sum(dev**2, axis=0)
        cross_b = dev[:, probe].T @ dev[:, probe]
        # Chan et al.'s merge of (count, mean, M2) and of the probe block of the co-moment matrix
        n, wb = smp.chan_weights(count, n_b)
        dp = (mu_b - mu)[probe]
        mu, m2 = smp.chan_merge(mu, m2, mu_b, m2_b, count, wb)
        cross = cross + cross_b + jnp.outer(dp, dp) * count * wb
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


def estimate_gradient(params, spec: MLPSpec, gaussian: Gaussian, config: PropagationConfig, output_weights):
    """``d (output_weights . estimate_mean) / d params`` through the cumulant estimator (a pytree, jitted)."""
    return _estimate_gradient(params, gaussian, jnp.asarray(output_weights), spec=spec, config=config)


@functools.partial(jax.jit, static_argnames=("spec", "config"))
def _estimate_gradient(params, gaussian, c, *, spec, config):
    return jax.grad(lambda p: estimate_mean(p, spec, gaussian, config) @ c)(params)
