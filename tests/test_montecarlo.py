"""The Monte Carlo sampler: closed forms, standard errors, streaming, vmap, sharding, bad inputs."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cumjax as cj

KEY = jax.random.PRNGKey(7)


def _net(n=8, L=3, acts="relu", bias=False, seed=0):
    spec = cj.MLPSpec(n, n, n, L, acts, init=cj.Init(b_var=0.1 if bias else 0.0))
    return spec, cj.init_params(jax.random.PRNGKey(seed), spec)


G = lambda mean, cov: cj.Gaussian(jnp.asarray(mean), jnp.asarray(cov))  # noqa: E731


@pytest.mark.parametrize("rank", [6, 2])  # full rank: Cholesky; rank 2: the eigen-root fallback
def test_linear_network_moments(rank):
    spec, params = _net(6, 1, bias=True)
    rng = np.random.default_rng(rank)
    mu = rng.normal(size=6)
    a = rng.normal(size=(6, rank))
    cov = a @ a.T / rank + (0.1 * np.eye(6) if rank == 6 else 0)
    N = 100_000
    r = cj.monte_carlo(KEY, params, spec, G(mu, cov), N, chunk_size=30_000, second_moments=True)
    ((W, b),) = cj.layer_weights(params)
    want_mean, want_cov = mu @ W + b, W.T @ cov @ W
    assert np.max(np.abs((r.mean["pre0"] - want_mean) / r.sem["pre0"])) < 4.5
    # sem^2 N is the sample variance: relative standard error sqrt(2 / N) ~ 0.45%
    np.testing.assert_allclose(r.sem["pre0"] ** 2 * N, np.diag(want_cov), rtol=0.03)
    second = want_cov + np.outer(want_mean, want_mean)
    np.testing.assert_allclose(r.second["pre0"], second, atol=0.03 * np.abs(second).max())


def _relu_layer():
    spec, params = _net(16, 2)
    return spec, params, jnp.full(16, 0.3), 0.5 * jnp.eye(16) + 0.5 / 16


def test_single_relu_layer_matches_gaussian_expectation():
    spec, params, mu, cov = _relu_layer()
    r = cj.monte_carlo(KEY, params, spec, G(mu, cov), 1 << 16)
    (W, _), _ = cj.layer_weights(params)
    want = cj.gaussian_expectation("relu", 0, 1, mu @ W, jnp.diag(W.T @ cov @ W))
    z = (r.mean["act0"] - want) / r.sem["act0"]
    # 16 standard normals: max |z| > 4.5 with probability ~1e-4, mean z^2 > 2.5 with probability ~1e-3
    assert np.max(np.abs(z)) < 4.5 and np.mean(z**2) < 2.5


def test_standard_error_shrinks_like_inverse_root_n():
    spec, params, mu, cov = _relu_layer()
    small, big = (cj.monte_carlo(KEY, params, spec, G(mu, cov), N).sem["pre1"] for N in (1 << 12, 1 << 16))
    assert float(jnp.mean(small) / jnp.mean(big)) == pytest.approx(4.0, rel=0.05)


def _chunked(chunk, **kw):
    spec, params = _net(bias=True)
    return (
        spec,
        params,
        cj.monte_carlo(
            KEY, params, spec, G(jnp.full(8, 0.1), jnp.eye(8)), 10_000, chunk_size=chunk, second_moments=True, **kw
        ),
    )


def test_samples_do_not_depend_on_chunking():
    """Sample i comes from fold_in(key, i): any chunk size (dividing N or not, larger than N) gives
    the same statistics up to rounding; a repeated call gives the same bits."""
    spec, params, ref = _chunked(2500)
    jax.tree_util.tree_map(np.testing.assert_array_equal, _chunked(2500)[2], ref)
    assert ref.num_samples == 10_000 and ref.mean["act1"].dtype == jnp.float64  # float64 accumulation (x64 on)
    # 4 chunks, the last one partial: float32 per-chunk sums differ in rounding only
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), _chunked(3000)[2], ref)
    # a float64 forward pass (float64 normals: other samples) in 4 chunks or in one (the chunk
    # size clipped to N): equal to float64 rounding
    a, b = (_chunked(c, dtype=None)[2] for c in (2500, 1 << 16))
    assert a.mean["pre2"].dtype == jnp.float64
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14), a, b)


def test_float32_accumulation_without_x64():
    spec, params, want = _chunked(2500)
    with jax.enable_x64(False):
        p32 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params)
        got = cj.monte_carlo(
            KEY,
            p32,
            spec,
            G(np.full(8, 0.1, np.float32), np.eye(8, dtype=np.float32)),
            10_000,
            chunk_size=2500,
            second_moments=True,
        )
        assert got.mean["pre2"].dtype == jnp.float32
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)


def test_jit_over_the_sampler():
    spec, params, want = _chunked(2500)
    mc = jax.jit(
        lambda p, k: cj.monte_carlo(
            k, p, spec, G(jnp.full(8, 0.1), jnp.eye(8)), 10_000, chunk_size=2500, second_moments=True
        )
    )
    got = mc(params, KEY)
    assert got.num_samples == 10_000
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)


def test_vmap_over_networks_matches_loop():
    spec = cj.MLPSpec(8, 8, 8, 3, ("relu", "tanh"))
    nets = [cj.init_params(jax.random.PRNGKey(s), spec) for s in range(3)]
    batched = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *nets)
    got = cj.monte_carlo_batched(
        KEY, batched, spec, G(jnp.zeros(8), jnp.eye(8)), 5000, chunk_size=2048, second_moments=True
    )
    assert got.mean["pre2"].shape == (3, 8) and got.second["act1"].shape == (3, 8, 8)
    for i, (k, p) in enumerate(zip(jax.random.split(KEY, 3), nets)):
        want = cj.monte_carlo(k, p, spec, G(jnp.zeros(8), jnp.eye(8)), 5000, chunk_size=2048, second_moments=True)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-6, atol=1e-7), got, want)


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
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
        # float64 forward pass, so that the only difference is the merge order; 9001 = 4 x 2251 - 3
        args = (jax.random.PRNGKey(5), p, spec, cj.Gaussian(jnp.full(8, 0.2), jnp.eye(8) + 0.1), 9001)
        one = cj.monte_carlo(*args, chunk_size=1000, second_moments=True, dtype=None)
        four = cj.monte_carlo_sharded(*args, mesh, chunk_size=1000, second_moments=True, dtype=None)
        assert four.num_samples == 9001 and four.mean["pre2"].dtype == jnp.float64
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14), four, one)
        print("OK")
    """)
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), ".."))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize(
    "mean,cov,match",
    [
        (np.zeros(7), np.eye(8), "shape"),
        (np.zeros((8, 1)), np.eye(8), "shape"),
        (np.zeros(8), np.eye(7), "shape"),
        (np.r_[np.nan, np.zeros(7)], np.eye(8), "NaN"),
        (np.zeros(8), np.diag(np.r_[np.inf, np.ones(7)]), "NaN"),
        (np.zeros(8), np.diag(np.r_[-0.5, np.ones(7)]), "semi-definite"),
        (np.zeros(8), np.eye(8) + np.eye(8, k=1), "symmetric"),
    ],
)
def test_bad_input_raises(mean, cov, match):
    spec, params = _net()
    with pytest.raises(ValueError, match=match):
        cj.monte_carlo(KEY, params, spec, cj.Gaussian(mean, cov), 100)


def test_bad_network_or_sizes_raise():
    spec, params = _net()
    good = (cj.Gaussian(jnp.zeros(8), jnp.eye(8)),)
    with pytest.raises(ValueError, match="unknown activation"):
        cj.MLPSpec(8, 8, 8, 2, ("softplus",))
    with pytest.raises(ValueError, match="NaN or Inf"):
        bad = jax.tree_util.tree_map(lambda a: a.at[0, 0].set(jnp.nan), params)
        cj.monte_carlo(KEY, bad, spec, *good, 100)
    with pytest.raises(ValueError, match="linear layers"):
        cj.monte_carlo(KEY, params, cj.MLPSpec(8, 8, 8, 2, "relu"), *good, 100)
    with pytest.raises(ValueError, match="layer0 kernel has shape"):
        cj.monte_carlo(KEY, params, cj.MLPSpec(8, 9, 8, 3, "relu"), *good, 100)
    with pytest.raises(ValueError, match="num_samples"):
        cj.monte_carlo(KEY, params, spec, *good, 1)
    with pytest.raises(ValueError, match="chunk_size"):
        cj.monte_carlo(KEY, params, spec, *good, 100, chunk_size=0)
    with pytest.raises(ValueError, match="samples per call"):
        cj.monte_carlo(KEY, params, spec, *good, 2**32)
    with pytest.raises(ValueError, match="kernel has shape"):  # batched params need the leading axis
        cj.monte_carlo_batched(KEY, params, spec, *good, 100)


def test_forward_flops():
    spec = cj.MLPSpec(10, 20, 5, 3, "relu", use_bias=True)
    assert cj.forward_flops(spec) == (2 * 10 * 20 + 20 + 20) + (2 * 20 * 20 + 20 + 20) + (2 * 20 * 5 + 5)
    assert cj.forward_flops(cj.MLPSpec(10, 20, 5, 1)) == 2 * 10 * 5


def test_deprecated_call_form():
    spec, params = _net()
    new = cj.monte_carlo(KEY, params, spec, G(jnp.zeros(8), jnp.eye(8)), 1000)
    with pytest.warns(DeprecationWarning, match="deprecated"):
        old = cj.monte_carlo(KEY, params, spec, jnp.zeros(8), jnp.eye(8), 1000)
    jax.tree_util.tree_map(np.testing.assert_array_equal, new, old)
