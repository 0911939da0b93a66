"""Rare events and audits: tail probabilities of neurons through the estimator, their sampled
ground truth (plain and importance-sampled), and gradient tools for auditing networks.

Tail probabilities (as in the paper): for ``z = pre{layer}`` of an MLP, ``P(z_i > t)`` is the mean
output of the *thresholded network*: the layers up to ``layer`` with bias ``b - t``, a heaviside
nonlinearity, and a fixed 0/1 selection layer ``(n, m)`` as output, so its output is the indicator
``1[z_i > t]`` of the selected neurons and cumulant propagation estimates its mean.

Ground truth for tiny probabilities (:func:`tail_importance_sampling`): importance sampling by
tilting the input Gaussian. With ``x = mean + F e`` (``F F^T = cov``), ``e`` is drawn from the
defensive mixture ``a N(0, I) + (1 - a) N(alpha v, I)`` and weighted by the likelihood ratio, which
is at most ``1 / a``: unbiased for every proposal, never worse than ``1 / a`` times plain sampling.
``v``: the mean input above a high quantile of z_i in plain draws; ``alpha``: a one-dimensional
cross-entropy fit (a full 128-dimensional mean shift fitted from few elite samples degenerates:
tried, and it underestimated 1e-5 tails by orders of magnitude). For ReLU nets without biases on
a zero-mean input, z is positively homogeneous in ``e``, so each indicator is replaced by its exact
expectation along the ray through the sample (``|e| ~ chi_d``, independent of the direction).
Validate against plain sampling (:func:`tail_monte_carlo`) where that resolves the probability.
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

from .flops import compiled_cost, jaxpr_flops
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
               weight_variances=None) -> dict:
    """FLOPs of :func:`tail_probabilities` for all thresholds at once: ``analytic`` (the jaxpr count
    of :func:`cumjax.flops.jaxpr_flops`, the same rule as :func:`cumjax.estimator_flops`) and
    ``xla`` (XLA's cost analysis of the unrolled program, flops + transcendentals)."""
    t = jnp.asarray(thresholds)

    def fn(p, m, c, t, unroll=False):
        return tail_probabilities(p, activations, m, c, layer, t, config, neurons, weight_variances, unroll)

    analytic = jaxpr_flops(fn, params, mean, cov, t).total
    xla = compiled_cost(functools.partial(fn, unroll=True), params, mean, cov, t)
    return dict(analytic=float(analytic), xla=xla["flops"] + xla["transcendentals"])


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


def _inputs(e, mean, factor):
    return mean + (e if factor is None else jnp.matmul(e, factor.T, precision=HIGHEST))


@functools.partial(jax.jit, static_argnames=("spec", "num_chunks", "chunk"))
def _tail_sums(key, params, mean, factor, thresholds, num_samples, *, spec, num_chunks, chunk):
    """Counts of ``z > t`` over ``num_samples`` inputs, ``(T, n)`` for thresholds ``(T, n)``; the
    sample count is traced (one compile for every count up to ``num_chunks * chunk``)."""
    acc, d = _acc(), mean.shape[0]

    def body(total, c):
        e = jax.random.normal(jax.random.fold_in(key, c), (chunk, d), mean.dtype)
        z = forward(params, spec, _inputs(e, mean, factor))
        valid = c * chunk + jnp.arange(chunk) < num_samples
        hit = (z[:, None, :] > thresholds[None]) & valid[:, None, None]
        return total + jnp.sum(hit, axis=0, dtype=acc), None

    total, _ = jax.lax.scan(body, jnp.zeros(thresholds.shape, acc), jnp.arange(num_chunks))
    return total


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
    Returns ``(T, n)`` frequencies and standard errors ``sqrt(p (1 - p) / (N - 1))``."""
    num_samples, _ = _check_samples(num_samples, chunk_size)
    chunk = default_chunk_size() if chunk_size is None else int(chunk_size)  # fixed: small counts share a compile
    trunc, tp, mean, factor = _prepare_sampling(params, spec, layer, mean, cov, dtype)
    t = jnp.asarray(thresholds, dtype)
    t = jnp.broadcast_to(t.reshape(t.shape[0], -1), (t.shape[0], trunc.output_dim))
    count = _tail_sums(key, tp, mean, factor, t, jnp.asarray(num_samples, jnp.int64 if jax.config.jax_enable_x64 else jnp.int32),
                       spec=trunc, num_chunks=-(-num_samples // chunk), chunk=chunk)
    m, se = _moments(count, count, num_samples)
    return TailEstimate(np.asarray(m), np.asarray(se), num_samples)


def is_homogeneous(params, spec: MLPSpec, layer: int, mean) -> bool:
    """Is ``z = pre{layer}`` positively homogeneous in the whitened input, ``z(c e) = c z(e)`` for
    ``c > 0``? True for ReLU nets with zero biases up to ``layer`` on a zero-mean input."""
    layers = layer_weights(params)[:layer + 1]
    relu = all(a == "relu" for a in spec.activations[:layer])
    no_bias = all(b is None or not np.any(np.asarray(b)) for _, b in layers)
    return relu and no_bias and not np.any(np.asarray(mean))


def _radial_tail(g, t, d):
    """``P(R g > t)`` for ``R ~ chi_d`` (the norm of a d-dim standard normal), elementwise."""
    ratio = t / jnp.where(g == 0, 1.0, g)
    above = jax.scipy.special.gammaincc(d / 2, 0.5 * ratio**2)  # P(R > |t / g|)
    pos = jnp.where(t > 0, above, 1.0)
    neg = jnp.where(t >= 0, 0.0, 1.0 - above)
    return jnp.where(g > 0, pos, jnp.where(g < 0, neg, (t < 0).astype(g.dtype)))


@functools.partial(jax.jit, static_argnames=("spec", "num_samples", "quantile"))
def _pilot_directions(key, params, mean, factor, *, spec, num_samples, quantile):
    """Per neuron of z: the mean whitened input over the plain samples above the ``quantile`` of
    z_i, ``(n, d)`` (the event's direction in input space, fitted where events are common)."""
    e = jax.random.normal(key, (num_samples, mean.shape[0]), mean.dtype)
    z = forward(params, spec, _inputs(e, mean, factor))
    k = max(1, int(round((1 - quantile) * num_samples)))
    _, idx = jax.lax.top_k(z.T, k)  # (n, k)
    return jnp.mean(e[idx], axis=1)


def _mixture_weight(e, shift, defensive, acc):
    """Likelihood ratio N(0, I) / (a N(0, I) + (1 - a) N(shift, I)) at ``e``: at most ``1 / a``."""
    s = shift.astype(acc)
    log_ratio = e.astype(acc) @ s - 0.5 * s @ s  # log N(shift, I) / N(0, I)
    return 1.0 / (defensive + (1 - defensive) * jnp.exp(log_ratio))


def _mixture_draw(key, shape, shift, defensive, dtype):
    k1, k2 = jax.random.split(key)
    e = jax.random.normal(k1, shape, dtype)
    use_shift = jax.random.uniform(k2, shape[:1]) >= defensive
    return e + use_shift[:, None].astype(dtype) * shift


def _score(params, spec, mean, factor, e, neuron, threshold, radial, acc):
    """The per-sample quantity whose nominal mean is ``P(z_i > t)``: the indicator, or with
    ``radial`` its conditional expectation along the ray through ``e`` (homogeneous nets)."""
    if radial:
        norm = jnp.linalg.norm(e.astype(acc), axis=1)
        g = forward(params, spec, _inputs((e / norm[:, None].astype(e.dtype)), mean, factor))[:, neuron]
        return _radial_tail(g.astype(acc), jnp.asarray(threshold, acc), e.shape[1])
    z = forward(params, spec, _inputs(e, mean, factor))[:, neuron]
    return (z > threshold).astype(acc)


@functools.partial(jax.jit, static_argnames=("spec", "num_samples", "iterations", "rho", "defensive"))
def _fit_magnitude(key, params, mean, factor, direction, neuron, threshold, *, spec, num_samples, iterations, rho, defensive):
    """One-dimensional cross-entropy fit of the shift ``alpha v`` along the unit ``direction`` v:
    ``alpha <- E_w[e . v | z_i >= gamma]``, ``gamma`` the (1 - rho) quantile capped at t."""
    acc = _acc()
    n_elite = max(1, int(math.ceil(rho * num_samples)))

    def step(alpha, k):
        shift = (alpha * direction).astype(mean.dtype)
        e = _mixture_draw(k, (num_samples, mean.shape[0]), shift, defensive, mean.dtype)
        z = forward(params, spec, _inputs(e, mean, factor))[:, neuron]
        gamma = jnp.minimum(threshold, jax.lax.top_k(z, n_elite)[0][-1])
        w = jnp.where(z >= gamma, _mixture_weight(e, shift, defensive, acc), 0.0)
        return (w @ (e.astype(acc) @ direction.astype(acc)) / jnp.sum(w)).astype(acc), gamma

    alpha, _ = jax.lax.scan(step, jnp.zeros((), acc), jax.random.split(key, iterations))
    return alpha


@functools.partial(jax.jit, static_argnames=("spec", "num_samples", "chunk", "radial", "defensive"))
def _is_sums(key, params, mean, factor, shift, neuron, threshold, *, spec, num_samples, chunk, radial, defensive):
    acc, d = _acc(), mean.shape[0]

    def body(carry, c):
        e = _mixture_draw(jax.random.fold_in(key, c), (chunk, d), shift, defensive, mean.dtype)
        valid = c * chunk + jnp.arange(chunk) < num_samples
        y = jnp.where(valid, _mixture_weight(e, shift, defensive, acc)
                      * _score(params, spec, mean, factor, e, neuron, threshold, radial, acc), 0.0)
        s1, s2 = carry
        return (s1 + jnp.sum(y), s2 + jnp.sum(y * y)), None

    (s1, s2), _ = jax.lax.scan(body, (jnp.zeros((), acc), jnp.zeros((), acc)), jnp.arange(-(-num_samples // chunk)))
    return s1, s2


def tail_importance_sampling(key, params, spec: MLPSpec, mean, cov, layer: int, neurons, thresholds, num_samples: int,
                             pilot_samples: int = 2**16, pilot_quantile: float = 0.99, ce_samples: int = 8192,
                             ce_iterations: int = 4, ce_rho: float = 0.1, defensive: float = 0.2, radial: bool | None = None,
                             chunk_size: int | None = None, dtype=jnp.float32) -> tuple[TailEstimate, np.ndarray]:
    """Importance-sampled ``P(z_i > t)`` for P pairs ``(neurons[p], thresholds[p])``, ``z = pre{layer}``.

    Proposal: the defensive mixture ``a N(0, I) + (1 - a) N(alpha v_i, I)`` in whitened input space,
    ``a = defensive``. ``v_i``: direction of the mean input above the ``pilot_quantile`` of z_i in
    ``pilot_samples`` plain draws (shared by all pairs); ``alpha``: one-dimensional cross-entropy
    fit per pair. The weights are at most ``1 / a``, so the variance is never more than ``1 / a``
    times plain sampling's, and the estimate is unbiased for every proposal. ``radial`` (default:
    when :func:`is_homogeneous`) replaces each indicator by its exact expectation along the ray
    through the sample (``|e| ~ chi_d`` independent of the direction), a conditional expectation
    that can only lower the variance. Returns ``(TailEstimate with (P,) arrays, shifts (P, d))``."""
    num_samples, chunk = _check_samples(num_samples, chunk_size)
    neurons, thresholds = np.asarray(neurons, int).reshape(-1), np.asarray(thresholds, float).reshape(-1)
    if neurons.shape != thresholds.shape:
        raise ValueError(f"need one threshold per neuron index, got {neurons.shape} and {thresholds.shape}")
    if not (0 < ce_rho < 1 and 0 < defensive < 1 and 0 < pilot_quantile < 1) or ce_iterations < 1:
        raise ValueError("need 0 < ce_rho, defensive, pilot_quantile < 1 and ce_iterations >= 1")
    radial = is_homogeneous(params, spec, layer, mean) if radial is None else bool(radial)
    if radial and not is_homogeneous(params, spec, layer, mean):
        raise ValueError("radial integration needs a positively homogeneous z (ReLU, zero biases, zero input mean)")
    trunc, tp, mean, factor = _prepare_sampling(params, spec, layer, mean, cov, dtype)
    if neurons.min() < 0 or neurons.max() >= trunc.output_dim:
        raise ValueError(f"neuron indices must lie in [0, {trunc.output_dim})")
    k_pilot, k_pairs = jax.random.split(key)
    pilot = _pilot_directions(k_pilot, tp, mean, factor, spec=trunc, num_samples=int(pilot_samples), quantile=float(pilot_quantile))
    ests, sems, shifts = [], [], []
    for p, (i, t) in enumerate(zip(neurons, thresholds)):  # compiled once, reused for every pair
        k_fit, k_est = jax.random.split(jax.random.fold_in(k_pairs, p))
        v = pilot[i] / jnp.linalg.norm(pilot[i])
        t_ = jnp.asarray(t, dtype)
        alpha = _fit_magnitude(k_fit, tp, mean, factor, v, int(i), t_, spec=trunc, num_samples=int(ce_samples),
                               iterations=int(ce_iterations), rho=float(ce_rho), defensive=float(defensive))
        shift = (alpha * v).astype(dtype)
        s1, s2 = _is_sums(k_est, tp, mean, factor, shift, int(i), t_, spec=trunc, num_samples=num_samples, chunk=chunk,
                          radial=radial, defensive=float(defensive))
        m, se = _moments(s1, s2, num_samples)
        ests.append(float(m)), sems.append(float(se)), shifts.append(np.asarray(shift))
    return TailEstimate(np.array(ests), np.array(sems), num_samples), np.stack(shifts)


# ----------------------------------------------------------------------------- auditing


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


def minimal_perturbation(objective: Callable[[list], Array], kernels: Sequence[Array], target: float,
                         steps: int = 300, learning_rate: float = 0.01, penalty: float = 100.0, margin: float = 0.05,
                         polish_steps: int = 8, bisection_steps: int = 40) -> PerturbationResult:
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
    """``d (output_weights . estimate_mean) / d params`` through the cumulant estimator (a pytree, jitted)."""
    wv = None if weight_variances is None else tuple(float(v) for v in weight_variances)
    return _estimate_gradient(params, mean, cov, jnp.asarray(output_weights), activations=tuple(activations), config=config,
                              weight_variances=wv)


@functools.partial(jax.jit, static_argnames=("activations", "config", "weight_variances"))
def _estimate_gradient(params, mean, cov, c, *, activations, config, weight_variances):
    return jax.grad(lambda p: estimate_mean(p, activations, mean, cov, config, weight_variances) @ c)(params)
