"""Every public entry point under jit, grad and vmap, with any mix of closed-over and traced
arguments, equals its eager value (the patterns a JAX user tries first)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cumjax as cj
from cumjax import tails, train

N, L = 6, 3
SPEC = cj.MLPSpec(N, N, N, L, ("relu", "tanh"), init=cj.Init(kind="he", b_var=0.05))
PARAMS = cj.init_params(jax.random.PRNGKey(0), SPEC, dtype=jnp.float64)
MEAN = jnp.linspace(-0.3, 0.4, N)
COV = 0.8 * jnp.eye(N) + 0.2 / N
G = cj.Gaussian(MEAN, COV)
CFGS = [cj.PropagationConfig(k_max=2, kind="augment"), cj.PropagationConfig(k_max=3, factored=True)]
close = lambda a, b: chex.assert_trees_all_close(a, b, rtol=1e-10, atol=1e-13)  # noqa: E731


def _fd(f, x, d, eps=1e-6):
    return (f(x + eps * d) - f(x - eps * d)) / (2 * eps)


def test_factored_estimate_under_jit_with_closed_over_params():
    cfg = CFGS[1]
    eager = cj.estimate_mean(PARAMS, SPEC, G, cfg)
    close(jax.jit(lambda m: cj.estimate_mean(PARAMS, SPEC, cj.Gaussian(m, COV), cfg))(MEAN), eager)
    f = lambda m: jnp.sum(cj.estimate_mean(PARAMS, SPEC, cj.Gaussian(m, COV), cfg))  # noqa: E731
    close(jax.jit(jax.grad(f))(MEAN), jax.grad(f)(MEAN))


def test_estimate_mean_patterns():
    cfg = CFGS[0]
    eager = cj.estimate_mean(PARAMS, SPEC, G, cfg)
    # params closed over, only the input traced: the most common pattern
    close(jax.jit(lambda m: cj.estimate_mean(PARAMS, SPEC, cj.Gaussian(m, COV), cfg))(MEAN), eager)
    close(jax.jit(lambda c: cj.estimate_mean(PARAMS, SPEC, cj.Gaussian(MEAN, c), cfg))(COV), eager)
    close(jax.jit(lambda g: cj.estimate_mean(PARAMS, SPEC, g, cfg))(G), eager)
    close(jax.jit(cj.estimate_mean, static_argnums=(1, 3))(PARAMS, SPEC, G, cfg), eager)
    # everything traced but the static structure
    close(jax.jit(lambda p, g: cj.estimate_mean(p, SPEC, g, cfg))(PARAMS, G), eager)
    # grad w.r.t. the input mean, eager and jitted, against finite differences
    f = lambda m: jnp.sum(jnp.sin(cj.estimate_mean(PARAMS, SPEC, cj.Gaussian(m, COV), cfg)))  # noqa: E731
    g_eager, g_jit = jax.grad(f)(MEAN), jax.jit(jax.grad(f))(MEAN)
    close(g_jit, g_eager)
    d = jnp.cos(jnp.arange(N))
    assert float(jnp.vdot(g_eager, d)) == pytest.approx(float(_fd(f, MEAN, d)), rel=1e-6, abs=1e-10)
    # grad w.r.t. params with the input closed over
    gp = jax.jit(jax.grad(lambda p: jnp.sum(cj.estimate_mean(p, SPEC, G, cfg))))(PARAMS)
    close(
        gp["params"]["layer0"]["kernel"],
        jax.grad(lambda p: jnp.sum(cj.estimate_mean(p, SPEC, G, cfg)))(PARAMS)["params"]["layer0"]["kernel"],
    )
    # vmap over input means
    means = jnp.stack([MEAN, -MEAN, 0 * MEAN])
    batched = jax.vmap(lambda m: cj.estimate_mean(PARAMS, SPEC, cj.Gaussian(m, COV), cfg))(means)
    close(batched[1], cj.estimate_mean(PARAMS, SPEC, cj.Gaussian(-MEAN, COV), cfg))


def test_propagate_patterns():
    cfg = cj.PropagationConfig(k_max=2, kind="augment")  # degree 3 tracked in radial form
    eager = cj.propagate(PARAMS, SPEC, G, cfg)
    jitted = jax.jit(cj.propagate, static_argnums=(1, 3))(PARAMS, SPEC, G, cfg)
    closed = jax.jit(lambda m: cj.propagate(PARAMS, SPEC, cj.Gaussian(m, COV), cfg))(MEAN)
    for out in (jitted, closed):
        assert isinstance(out, cj.Cumulants) and out.labels == eager.labels
        for label in eager.labels:
            assert out.degrees(label) == eager.degrees(label)
            close(out.mean(label), eager.mean(label))
            close(out.cov(label), eager.cov(label))
        close(out.dense("act1", 3), eager.dense("act1", 3))
    # vmap over networks: every leaf gains the network axis
    stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), PARAMS, PARAMS)
    many = jax.vmap(lambda p: cj.propagate(p, SPEC, G, cfg))(stacked)
    close(many.mean()[1], eager.mean())
    assert jax.grad(lambda c: jnp.sum(cj.propagate(PARAMS, SPEC, cj.Gaussian(MEAN, c), cfg).cov()))(COV).shape == (N, N)


def test_monte_carlo_patterns():
    key, n = jax.random.PRNGKey(3), 2048
    eager = cj.monte_carlo(key, PARAMS, SPEC, G, n, chunk_size=512, dtype=jnp.float64)
    out = SPEC.labels[-1]
    close(
        jax.jit(lambda k: cj.monte_carlo(k, PARAMS, SPEC, G, n, chunk_size=512, dtype=jnp.float64).mean[out])(key),
        eager.mean[out],
    )
    close(
        jax.jit(
            lambda m: cj.monte_carlo(key, PARAMS, SPEC, cj.Gaussian(m, COV), n, chunk_size=512, dtype=jnp.float64).mean[
                out
            ]
        )(MEAN),
        eager.mean[out],
    )
    close(
        jax.jit(lambda p, g: cj.monte_carlo(key, p, SPEC, g, n, chunk_size=512, dtype=jnp.float64).sem[out])(PARAMS, G),
        eager.sem[out],
    )
    # pathwise gradient of the sample mean w.r.t. the input mean: the same samples, so jit == eager
    f = lambda m: jnp.sum(
        cj.monte_carlo(
            key,
            PARAMS,
            SPEC,
            cj.Gaussian(m, COV),
            n,
            chunk_size=512,  # noqa: E731
            dtype=jnp.float64,
        ).mean[out]
    )
    close(jax.jit(jax.grad(f))(MEAN), jax.grad(f)(MEAN))
    keys = jax.random.split(key, 2)
    many = jax.vmap(lambda k: cj.monte_carlo(k, PARAMS, SPEC, G, n, chunk_size=512, dtype=jnp.float64).mean[out])(keys)
    close(many[1], cj.monte_carlo(keys[1], PARAMS, SPEC, G, n, chunk_size=512, dtype=jnp.float64).mean[out])


def test_tail_probabilities_patterns():
    cfg, t = cj.PropagationConfig(k_max=2), jnp.array([0.2, 1.0])
    eager = tails.tail_probabilities(PARAMS, SPEC, G, 1, t, cfg)
    assert eager.shape == (2, N)
    close(jax.jit(lambda t: tails.tail_probabilities(PARAMS, SPEC, G, 1, t, cfg))(t), eager)
    close(jax.jit(lambda g: tails.tail_probabilities(PARAMS, SPEC, g, 1, t, cfg))(G), eager)
    close(jax.jit(lambda p, g, t: tails.tail_probabilities(p, SPEC, g, 1, t, cfg))(PARAMS, G, t), eager)
    f = lambda t: jnp.sum(tails.tail_probabilities(PARAMS, SPEC, G, 1, t, cfg))  # noqa: E731
    grad = jax.jit(jax.grad(f))(t)
    close(grad, jax.grad(f)(t))
    assert np.all(np.asarray(grad) < 0)  # raising a threshold lowers every tail probability
    d = jnp.array([1.0, -0.5])
    assert float(jnp.vdot(grad, d)) == pytest.approx(float(_fd(f, t, d)), rel=1e-6)
    close(jax.vmap(lambda s: tails.tail_probabilities(PARAMS, SPEC, G, 1, s[None], cfg)[0])(t), eager)


def test_training_loss_patterns():
    cfg = cj.PropagationConfig(k_max=2, kind="augment")
    target = train.Moments(jnp.full(N, 0.1), 0.5 * jnp.eye(N))
    eager = train.estimated_loss(PARAMS, SPEC, G, cfg, target)
    close(jax.jit(lambda p: train.estimated_loss(p, SPEC, G, cfg, target))(PARAMS), eager)
    close(jax.jit(lambda g, tg: train.estimated_loss(PARAMS, SPEC, g, cfg, tg))(G, target), eager)
    grad = jax.jit(jax.grad(lambda p: train.estimated_loss(p, SPEC, G, cfg, target)))(PARAMS)
    close(
        grad["params"]["layer1"]["kernel"],
        jax.grad(lambda p: train.estimated_loss(p, SPEC, G, cfg, target))(PARAMS)["params"]["layer1"]["kernel"],
    )
    targets = train.Moments(jnp.stack([target.mean, 2 * target.mean]), jnp.stack([target.cov, target.cov]))
    close(jax.vmap(lambda tg: train.estimated_loss(PARAMS, SPEC, G, cfg, tg))(targets)[0], eager)
    x = train.gaussian_batch(jax.random.PRNGKey(1), G, 16)
    s_eager = train.sampled_loss(PARAMS, SPEC, x, target)
    close(jax.jit(lambda p, x: train.sampled_loss(p, SPEC, x, target))(PARAMS, x), s_eager)
    sg = jax.jit(jax.grad(lambda p: train.sampled_loss(p, SPEC, x, target)))(PARAMS)
    close(
        sg["params"]["layer0"]["kernel"],
        jax.grad(lambda p: train.sampled_loss(p, SPEC, x, target))(PARAMS)["params"]["layer0"]["kernel"],
    )
    close(jax.jit(lambda k: train.gaussian_batch(k, G, 16))(jax.random.PRNGKey(1)), x)
