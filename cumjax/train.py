"""Training through the estimator ("mechanistic distillation").

A student MLP is fitted so that the first two moments of its output on a Gaussian input match
a target (for example a teacher network's), with the moment-matching loss

    L(params) = ||E[g(x)] - mu*||^2 + ||Cov[g(x)] - Sigma*||_F^2,    x ~ N(mean, cov) (a Gaussian).

Three ways to evaluate it, all pure functions of the params pytree:

* :func:`estimated_loss`: L at the cumulant-propagation estimate of the output mean and
  covariance (no samples; differentiable, so ``jax.grad`` gives the training signal).
* :func:`sampled_loss`: an unbiased estimate of L from a minibatch of samples (split-half: the
  two halves' deviations are independent, so their inner product has expectation L); its
  pathwise gradient is an unbiased estimate of grad L.
* :func:`monte_carlo_loss`: L from a large independent Monte Carlo run split into groups, as a
  U-statistic over pairs of groups (unbiased) with a jackknife standard error; the referee.

:func:`fit` runs an optax optimiser on any ``loss_fn(params, key, data)`` (for example
:func:`estimated_objective` or :func:`sampled_objective` with a :class:`MomentProblem`) under
``lax.scan`` between checkpoints, records a learning curve, and saves its state atomically at every
checkpoint so an interrupted run resumes and reproduces the uninterrupted curve exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from typing import NamedTuple

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._io import atomic_write
from .config import PropagationConfig
from .gaussian import Gaussian
from .mlp import HIGHEST, MLPSpec, forward
from .montecarlo import monte_carlo_batched
from .propagation import propagate

Array = jax.Array


class Moments(NamedTuple):
    """Output mean ``(d_out,)`` and covariance ``(d_out, d_out)``."""

    mean: Array
    cov: Array


def moment_loss(moments: Moments, target: Moments) -> Array:
    """``||mean - target.mean||^2 + ||cov - target.cov||_F^2`` (a scalar)."""
    return jnp.sum((moments.mean - target.mean) ** 2) + jnp.sum((moments.cov - target.cov) ** 2)


# ----------------------------------------------------------------------------- estimated


def estimated_moments(
    params, spec: MLPSpec, gaussian: Gaussian, config: PropagationConfig, unroll: bool = False
) -> Moments:
    """Cumulant-propagation estimate of the output mean and covariance (degrees 1 and 2 of the
    output tower). At ``k_max = 1`` only the trace of the covariance is tracked, so the estimated
    covariance is diagonal (``c * diag(W^T W)`` at the output layer)."""
    config = dataclasses.replace(config, output_degree=2)
    out = propagate(params, spec, gaussian, config, unroll=unroll)
    return Moments(out.mean(), out.cov())


def estimated_loss(
    params, spec: MLPSpec, gaussian: Gaussian, config: PropagationConfig, target: Moments, unroll: bool = False
) -> Array:
    """:func:`moment_loss` at the estimated output moments: no samples, differentiable in params
    (and in the input moments and the target)."""
    return moment_loss(estimated_moments(params, spec, gaussian, config, unroll), target)


# ----------------------------------------------------------------------------- sampled


def sample_moments(y: Array) -> Moments:
    """Sample mean and unbiased (ddof 1) covariance of rows ``y (m, d)``."""
    mean = jnp.mean(y, axis=0)
    dev = y - mean
    return Moments(mean, jnp.matmul(dev.T, dev, precision=HIGHEST) / (y.shape[0] - 1))


def sampled_loss(params, spec: MLPSpec, x: Array, target: Moments) -> Array:
    """Unbiased minibatch estimate of the moment-matching loss from inputs ``x (m, d_in)``, m even
    and >= 4: with ``a, b`` the moments of the two halves minus the target (independent, each
    unbiased), ``E[<a, b>] = L``. Its gradient is an unbiased estimate of grad L (the plug-in
    ``moment_loss(sample_moments(y))`` would add a ``tr(Cov)/m``-sized bias and its gradient)."""
    m = x.shape[0]
    if m % 2 or m < 4:
        raise ValueError(f"sampled_loss needs an even minibatch of at least 4 samples, got {m}")
    y = forward(params, spec, x)
    a, b = sample_moments(y[: m // 2]), sample_moments(y[m // 2 :])
    return jnp.sum((a.mean - target.mean) * (b.mean - target.mean)) + jnp.sum(
        (a.cov - target.cov) * (b.cov - target.cov)
    )


def gaussian_batch(key, gaussian: Gaussian, num_samples: int) -> Array:
    """``(num_samples, d)`` draws from ``gaussian`` (in its mean's dtype)."""
    mean = jnp.asarray(gaussian.mean)
    return jax.random.multivariate_normal(
        key, mean, jnp.asarray(gaussian.cov, mean.dtype), (num_samples,), dtype=mean.dtype, method="cholesky"
    )


# ----------------------------------------------------------------------------- objectives for fit


class MomentProblem(NamedTuple):
    """The data a moment-matching objective reads: target moments and the input distribution."""

    target: Moments
    gaussian: Gaussian


@functools.lru_cache(maxsize=64)
def estimated_objective(spec: MLPSpec, config: PropagationConfig) -> Callable:
    """``(params, key, MomentProblem) -> estimated_loss`` (the key is unused). Cached, so every
    call with the same spec and config returns the same function and :func:`fit` compiles once."""
    return lambda params, key, data: estimated_loss(params, spec, data.gaussian, config, data.target)


@functools.lru_cache(maxsize=64)
def sampled_objective(spec: MLPSpec, batch: int) -> Callable:
    """``(params, key, MomentProblem) -> sampled_loss`` on ``batch`` fresh inputs drawn from key."""
    return lambda params, key, data: sampled_loss(params, spec, gaussian_batch(key, data.gaussian, batch), data.target)


# ----------------------------------------------------------------------------- Monte Carlo referee


def monte_carlo_moments(
    key, params, spec: MLPSpec, gaussian: Gaussian, num_samples: int, groups: int = 1, chunk_size: int | None = None
) -> Moments:
    """Output moments of ``groups`` independent Monte Carlo runs of ``num_samples // groups``
    samples each (one vmapped, streamed call): mean ``(groups, d_out)``, unbiased covariance
    ``(groups, d_out, d_out)``. Forward passes in float32, sums in float64 when x64 is on."""
    per = num_samples // groups
    if groups < 1 or per < 2:
        raise ValueError(f"need groups >= 1 and >= 2 samples per group, got {num_samples} samples in {groups} groups")
    stacked = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (groups,) + a.shape), params)
    mc = monte_carlo_batched(key, stacked, spec, gaussian, per, chunk_size=chunk_size, second_moments=True)
    label = spec.labels[-1]
    mean, second = mc.mean[label], mc.second[label]
    cov = (second - mean[:, :, None] * mean[:, None, :]) * (per / (per - 1))
    return Moments(mean, cov)


def monte_carlo_loss(
    key,
    params,
    spec: MLPSpec,
    gaussian: Gaussian,
    target: Moments,
    num_samples: int,
    groups: int = 16,
    chunk_size: int | None = None,
) -> tuple[float, float]:
    """``(L, standard error)`` of the moment-matching loss from ``num_samples`` fresh samples in
    ``groups`` groups: the U-statistic ``mean_{g != h} <a_g, a_h>`` over the groups' deviations
    ``a_g = (mean_g - mu*, cov_g - Sigma*)`` (unbiased: distinct groups are independent), with a
    delete-one-group jackknife standard error. Can be slightly negative when L is near 0."""
    if groups < 3:
        raise ValueError(f"need groups >= 3 for a jackknife standard error, got {groups}")
    mom = monte_carlo_moments(key, params, spec, gaussian, num_samples, groups, chunk_size)
    a = np.concatenate(
        [
            np.asarray(mom.mean - target.mean, np.float64),
            np.asarray(mom.cov - target.cov, np.float64).reshape(groups, -1),
        ],
        axis=1,
    )
    total, sq = a.sum(0), np.einsum("gi,gi->g", a, a)

    def u(s, q, g):  # sum_{i != j} <a_i, a_j> / (g (g - 1)) from the sum and the squared norms
        return (np.dot(s, s) - q) / (g * (g - 1))

    value = u(total, sq.sum(), groups)
    rest = total[None, :] - a
    loo = (np.einsum("gi,gi->g", rest, rest) - (sq.sum() - sq)) / ((groups - 1) * (groups - 2))
    se = np.sqrt((groups - 1) / groups * np.sum((loo - loo.mean()) ** 2))
    return float(value), float(se)


# ----------------------------------------------------------------------------- training loop


class TrainState(NamedTuple):
    params: dict
    opt_state: optax.OptState
    step: Array  # () int32: steps taken


@functools.lru_cache(maxsize=64)
def make_segment(loss_fn: Callable, optimizer: optax.GradientTransformation, num_steps: int):
    """Jitted ``(state, key, data) -> (state, losses (num_steps,))``: ``num_steps`` steps on
    ``loss_fn(params, key, data)`` under ``lax.scan``; step t uses ``fold_in(key, t)``, so results
    depend only on the state, key and data. Cached: runs that share ``loss_fn`` and ``optimizer``
    (the same objects) and differ only in data share one compilation."""

    @jax.jit
    def segment(state: TrainState, key, data):
        def step(state, _):
            loss, grads = jax.value_and_grad(loss_fn)(state.params, jax.random.fold_in(key, state.step), data)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1), loss

        return jax.lax.scan(step, state, None, length=num_steps)

    return segment


def _load_checkpoint(path: str | None, template: TrainState, meta: str):
    if not path or not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        raw = flax.serialization.msgpack_restore(f.read())
    if raw.get("meta") != meta:
        return None  # another run's checkpoint: start over rather than mix
    return flax.serialization.from_state_dict(template, raw["state"]), json.loads(raw["curve"])


def _save_checkpoint(path: str, state: TrainState, curve: list, meta: str) -> None:
    """State (exact bits, msgpack) and curve (JSON text) in one file, replaced atomically."""
    data = flax.serialization.msgpack_serialize(
        {"meta": meta, "state": flax.serialization.to_state_dict(jax.device_get(state)), "curve": json.dumps(curve)}
    )

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def fit(
    loss_fn: Callable,
    params,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    *,
    key,
    eval_every: int,
    data=None,
    evaluate: Callable | None = None,
    flops_per_step: float = 0.0,
    checkpoint: str | None = None,
    meta: dict | None = None,
    on_checkpoint: Callable | None = None,
    progress: bool | str = False,
) -> tuple[dict, list[dict]]:
    """Minimise ``loss_fn(params, key, data) -> scalar`` with ``optimizer`` for ``num_steps`` steps.

    ``data``: any pytree the loss reads (targets, input moments), passed to the jitted steps as an
    argument so runs that differ only in it reuse one compilation (see :func:`make_segment`).

    Every ``eval_every`` steps (and at step 0): ``evaluate(params, step) -> (value, se)`` if given,
    a curve row ``{step, flops, train_loss, eval_loss, eval_se}`` (``train_loss``: mean of
    ``loss_fn`` over the steps since the last row; ``flops = step * flops_per_step``), the state
    and curve saved atomically to ``checkpoint`` (msgpack), then ``on_checkpoint(step)``. A rerun
    with the same ``checkpoint`` and ``meta`` resumes from the last saved step and, the steps being
    deterministic in (state, key), reproduces the uninterrupted curve. ``progress``: show a tqdm
    bar (labelled by it if a string). Returns ``(params, curve)``.
    """
    if num_steps < 0 or eval_every < 1 or num_steps % eval_every:
        raise ValueError(f"num_steps ({num_steps}) must be a non-negative multiple of eval_every ({eval_every})")
    meta = json.dumps(dict(meta or {}, num_steps=int(num_steps), eval_every=int(eval_every)), sort_keys=True)
    state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
    loaded = _load_checkpoint(checkpoint, state, meta)
    if loaded is not None:
        state, curve = loaded
    else:
        curve = []

    def record(losses):
        step = int(state.step)
        value, se = evaluate(state.params, step) if evaluate is not None else (None, None)
        curve.append(
            dict(
                step=step,
                flops=float(step * flops_per_step),
                train_loss=None if losses is None else float(np.mean(losses)),
                eval_loss=value,
                eval_se=se,
            )
        )
        if checkpoint:
            _save_checkpoint(checkpoint, state, curve, meta)
        if on_checkpoint is not None:
            on_checkpoint(step)

    if not curve:
        record(None)
    segment = make_segment(loss_fn, optimizer, eval_every)
    remaining = range(int(state.step), num_steps, eval_every)
    if progress:
        from tqdm import tqdm

        remaining = tqdm(remaining, desc=progress if isinstance(progress, str) else "fit", leave=False)
    for _ in remaining:
        state, losses = segment(state, key, data)
        record(np.asarray(losses))
    return state.params, curve
