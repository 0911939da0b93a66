"""The Monte Carlo sampler: closed forms, standard errors, streaming, vmap, sharding."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cumjax as cj


def _net(n=8, L=3, acts=None, bias=False, seed=0):
    spec = cj.MLPSpec(n, n, n, L, acts or ("relu",) * (L - 1), use_bias=bias)
    return spec, cj.init_params(jax.random.PRNGKey(seed), spec, cj.Init(b_var=0.1 if bias else 0.0))


def test_linear_network_mean_and_second_moment():
    spec, params = _net(6, 1, (), bias=True)
    rng = np.random.default_rng(0)
    mu = jnp.asarray(rng.normal(size=6))
    a = rng.normal(size=(6, 6))
    cov = jnp.asarray(a @ a.T / 6 + 0.1 * np.eye(6))
    r = cj.monte_carlo(jax.random.PRNGKey(0), params, spec, mu, cov, 200_000, chunk_size=30_000, second_moments=True)
    (W, b), = cj.layer_weights(params)
    want = mu @ W + b
    z = (r.mean["pre0"] - want) / r.sem["pre0"]
    assert np.max(np.abs(z)) < 4.5
    # sem^2 * N is the sample variance: compare with the exact output variance
    np.testing.assert_allclose(r.sem["pre0"] ** 2 * 200_000, jnp.diag(W.T @ cov @ W), rtol=0.02)
    second = W.T @ cov @ W + jnp.outer(want, want)
    np.testing.assert_allclose(r.second["pre0"], second, rtol=0.05, atol=0.05 * float(jnp.abs(second).max()))


def test_single_relu_layer_matches_gaussian_expectation():
    spec, params = _net(16, 2)
    mu, cov = jnp.full(16, 0.3), jnp.eye(16)
    r = cj.monte_carlo(jax.random.PRNGKey(1), params, spec, mu, cov, 1 << 17)
    (W, _), _ = cj.layer_weights(params)
    pre_mean, pre_var = mu @ W, jnp.diag(W.T @ W)
    want = cj.gaussian_expectation("relu", 0, 1, pre_mean, pre_var)
    z = (r.mean["act0"] - want) / r.sem["act0"]
    assert np.max(np.abs(z)) < 4.5 and np.mean(z**2) < 2.0


def test_standard_error_shrinks_like_inverse_root_n():
    spec, params = _net()
    small = cj.monte_carlo(jax.random.PRNGKey(2), params, spec, jnp.zeros(8), jnp.eye(8), 4096)
    big = cj.monte_carlo(jax.random.PRNGKey(2), params, spec, jnp.zeros(8), jnp.eye(8), 65536)
    ratio = float(jnp.mean(small.sem["pre2"]) / jnp.mean(big.sem["pre2"]))
    assert ratio == pytest.approx(4.0, rel=0.1)


def test_partial_last_chunk_and_determinism():
    spec, params = _net()
    f = lambda c: cj.monte_carlo(jax.random.PRNGKey(3), params, spec, jnp.zeros(8), jnp.eye(8), 10_000, chunk_size=c)  # noqa: E731
    a, b = f(3000), f(3000)
    np.testing.assert_array_equal(a.mean["pre2"], b.mean["pre2"])
    assert a.num_samples == 10_000
    # Streamed in 4 chunks (last one partial) vs one chunk: independent draws, equal in law
    c = f(10_000)
    z = (a.mean["pre2"] - c.mean["pre2"]) / jnp.sqrt(a.sem["pre2"] ** 2 + c.sem["pre2"] ** 2)
    assert np.max(np.abs(z)) < 4.5


def test_vmap_over_networks_matches_loop():
    spec = cj.MLPSpec(8, 8, 8, 3, ("relu", "tanh"))
    nets = [cj.init_params(jax.random.PRNGKey(s), spec) for s in range(3)]
    batched = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *nets)
    key = jax.random.PRNGKey(4)
    got = cj.monte_carlo_batched(key, batched, spec, jnp.zeros(8), jnp.eye(8), 5000, chunk_size=2048)
    for i, (k, p) in enumerate(zip(jax.random.split(key, 3), nets)):
        want = cj.monte_carlo(k, p, spec, jnp.zeros(8), jnp.eye(8), 5000, chunk_size=2048)
        np.testing.assert_allclose(got.mean["pre2"][i], want.mean["pre2"], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got.sem["pre2"][i], want.sem["pre2"], rtol=1e-8)


def test_sharded_over_four_host_devices_matches_one_device():
    code = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import jax, jax.numpy as jnp, numpy as np
        jax.config.update("jax_enable_x64", True)
        import cumjax as cj
        assert len(jax.devices()) == 4
        spec = cj.MLPSpec(8, 8, 8, 3, ("relu", "gelu"))
        p = cj.init_params(jax.random.PRNGKey(0), spec)
        args = (jax.random.PRNGKey(5), p, spec, jnp.zeros(8), jnp.eye(8), 9000)
        one = cj.monte_carlo(*args, chunk_size=1000, second_moments=True)
        four = cj.monte_carlo_sharded(*args, chunk_size=1000, second_moments=True)
        for k in one.mean:
            np.testing.assert_allclose(four.mean[k], one.mean[k], rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(four.sem[k], one.sem[k], rtol=1e-10)
            np.testing.assert_allclose(four.second[k], one.second[k], rtol=1e-12, atol=1e-14)
        print("OK")
    """)
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), ".."))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize(
    "mean,cov,match",
    [(jnp.zeros(7), jnp.eye(8), "shape"), (jnp.zeros(8).at[0].set(jnp.nan), jnp.eye(8), "NaN"),
     (jnp.zeros(8), jnp.eye(8).at[2, 2].set(-0.5), "semi-definite"), (jnp.zeros(8), jnp.eye(8).at[0, 1].set(0.5), "symmetric")],
)
def test_bad_input(mean, cov, match):
    spec, params = _net()
    with pytest.raises(ValueError, match=match):
        cj.monte_carlo(jax.random.PRNGKey(0), params, spec, mean, cov, 100)


def test_forward_flops():
    spec = cj.MLPSpec(10, 20, 5, 3, ("relu", "relu"), use_bias=True)
    assert cj.forward_flops(spec) == 2 * 10 * 20 + 20 + 20 + 2 * 20 * 20 + 20 + 20 + 2 * 20 * 5 + 5
