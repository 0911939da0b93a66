"""Cached, resumable, sharded ground truth (cumjax.groundtruth)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cumjax as cj
from cumjax import groundtruth as gt

ROOT = os.path.join(os.path.dirname(__file__), "..")
SPEC = cj.MLPSpec(input_dim=6, width=8, output_dim=4, num_layers=3, activations="tanh")


def _nets(spec=SPEC, n=3, seed=0):
    return gt.stack_networks([cj.init_params(jax.random.PRNGKey(seed + i), spec, dtype=jnp.float32) for i in range(n)])


def _input(d=6):
    return cj.Gaussian(jnp.full((d,), 0.3, jnp.float32), 0.5 * jnp.eye(d, dtype=jnp.float32) + 0.1)


def test_matches_batched_monte_carlo():
    # same keys and samples as the vmapped sampler: equal up to the order of float64 merges
    params, g = _nets(), _input()
    res = gt.ground_truth(
        params,
        SPEC,
        g,
        5000,
        seed=7,
        chunk_size=256,
        block_chunks=3,
        all_layers=True,
        second_moments=True,
        progress=False,
    )
    ref = cj.monte_carlo_batched(jax.random.PRNGKey(7), params, SPEC, g, 5000, chunk_size=256, second_moments=True)
    assert set(res.mean) == set(SPEC.labels) and res.num_samples == 5000
    for k in SPEC.labels:
        for field in ("mean", "sem", "second"):
            a, b = np.asarray(getattr(res, field)[k]), np.asarray(getattr(ref, field)[k])
            assert a.shape == b.shape and a.shape[0] == 3
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_linear_network_mean_within_standard_errors():
    # one linear layer: E[x W] = mean W exactly; the sample mean must sit within a few sems of it
    spec = cj.MLPSpec(input_dim=6, width=8, output_dim=5, num_layers=1)
    params, g = _nets(spec, 4), _input()
    res = gt.ground_truth(params, spec, g, 20000, seed=1, chunk_size=2048, progress=False)
    W = np.asarray(params["params"]["layer0"]["kernel"], np.float64)
    exact = np.einsum("d,bdo->bo", np.asarray(g.mean, np.float64), W)
    var = np.einsum("bdo,de,beo->bo", W, np.asarray(g.cov, np.float64), W)  # exact output variance
    z = (np.asarray(res.mean["pre0"]) - exact) / np.asarray(res.sem["pre0"])
    assert np.all(np.abs(z) < 5)
    # the sem is sqrt(var / N) to within its own sampling error (relative sd ~ 1/sqrt(2N))
    np.testing.assert_allclose(np.asarray(res.sem["pre0"]) ** 2 * 20000, var, rtol=5 * np.sqrt(2 / 20000))


def test_resume_after_interruption_is_bitwise_equal(tmp_path, monkeypatch):
    params, g = _nets(), _input()
    kw = dict(seed=3, chunk_size=128, block_chunks=2, all_layers=True, progress=False)
    full = gt.ground_truth(params, SPEC, g, 3000, **kw)  # no cache: one uninterrupted pass
    assert gt.ground_truth(params, SPEC, g, 3000, cache_dir=str(tmp_path), max_blocks=4, **kw) is None
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith(".npz")
    with np.load(tmp_path / files[0]) as z:
        assert int(z["blocks_done"]) == 4 and np.all(np.asarray(z["count"]) == 4 * 256)
    # the samples done so far are a ground truth of their own: the first 7 blocks of 256 samples
    part = gt.ground_truth(params, SPEC, g, 3000, cache_dir=str(tmp_path), max_blocks=3, partial=True, **kw)
    assert part.num_samples == 7 * 256
    ref = cj.monte_carlo_batched(jax.random.PRNGKey(3), params, SPEC, g, 7 * 256, chunk_size=128)
    np.testing.assert_allclose(np.asarray(part.mean["pre2"]), np.asarray(ref.mean["pre2"]), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(part.sem["pre2"]), np.asarray(ref.sem["pre2"]), rtol=1e-12, atol=1e-14)
    resumed = gt.ground_truth(params, SPEC, g, 3000, cache_dir=str(tmp_path), **kw)
    for k in SPEC.labels:
        np.testing.assert_array_equal(np.asarray(resumed.mean[k]), np.asarray(full.mean[k]))
        np.testing.assert_array_equal(np.asarray(resumed.sem[k]), np.asarray(full.sem[k]))

    # a finished result is read back without sampling again
    def boom(*a, **k):
        raise AssertionError("recomputed a cached ground truth")

    monkeypatch.setattr(gt, "_step", boom)
    cached = gt.ground_truth(params, SPEC, g, 3000, cache_dir=str(tmp_path), **kw)
    np.testing.assert_array_equal(np.asarray(cached.mean["pre2"]), np.asarray(full.mean["pre2"]))
    assert os.listdir(tmp_path) == files  # no temp files left behind


def test_cache_key_depends_on_what_the_numbers_depend_on():
    params, g = _nets(), _input()
    plan = gt.make_plan(1000, 100, 2)
    base = gt.cache_key(params, SPEC, g, 1000, 0, jnp.float32, plan, False)
    assert base == gt.cache_key(_nets(), SPEC, g, 1000, 0, jnp.float32, plan, False)
    changed = [
        gt.cache_key(_nets(seed=5), SPEC, g, 1000, 0, jnp.float32, plan, False),
        gt.cache_key(params, SPEC.__class__(6, 8, 4, 3, "relu"), g, 1000, 0, jnp.float32, plan, False),
        gt.cache_key(params, SPEC, cj.Gaussian(g.mean + 1, g.cov), 1000, 0, jnp.float32, plan, False),
        gt.cache_key(params, SPEC, cj.Gaussian(g.mean, g.cov * 2), 1000, 0, jnp.float32, plan, False),
        gt.cache_key(params, SPEC, g, 1001, 0, jnp.float32, plan, False),
        gt.cache_key(params, SPEC, g, 1000, 1, jnp.float32, plan, False),
        gt.cache_key(params, SPEC, g, 1000, 0, jnp.float64, plan, False),
        gt.cache_key(params, SPEC, g, 1000, 0, jnp.float32, plan, True),
    ]
    assert len({base, *changed}) == len(changed) + 1


def test_bad_input_raises_before_sampling():
    params, g = _nets(), _input()
    with pytest.raises(ValueError, match="num_samples"):
        gt.ground_truth(params, SPEC, g, 1, progress=False)
    with pytest.raises(ValueError, match="block_chunks"):
        gt.ground_truth(params, SPEC, g, 100, block_chunks=0, progress=False)
    with pytest.raises(ValueError, match="layer0 kernel has shape"):
        gt.ground_truth(_nets(cj.MLPSpec(5, 8, 4, 3, "tanh")), SPEC, g, 100, progress=False)


def test_compare_to_truth_ratio_and_upper_bound():
    rng = np.random.default_rng(0)
    B, n, N = 4, 500, 10_000
    sem = np.full((B, n), 0.01)  # floor 1e-4, variance 1
    truth = rng.normal(size=(B, n))
    far = cj.compare_to_truth(
        truth + rng.normal(scale=0.1, size=(B, n)), truth, sem, N, flops=100.0, forward_flops=10.0
    )
    assert far["resolved"] and far["noise_floor"] == pytest.approx(1e-4)
    # excess ~ 0.01 - 1e-4: MC needs var / excess samples at 10 FLOPs each, over 100 FLOPs
    assert far["ratio"] == pytest.approx(1.0 * 10 / (far["excess"] * 100))
    assert far["ratio_low"] < far["ratio"] < far["ratio_high"]
    assert abs(far["excess"] - 0.01) < 5 * far["excess_se"] + 1e-4
    near = cj.compare_to_truth(
        truth + rng.normal(scale=1e-3, size=(B, n)), truth, sem, N, flops=100.0, forward_flops=10.0
    )
    assert not near["resolved"] and "ratio" not in near
    assert near["mse_upper"] >= near["noise_floor"] and near["ratio_lower"] == pytest.approx(
        10 / (near["mse_upper"] * 100)
    )


def test_compare_to_truth_single_network_standard_error_is_calibrated():
    """One network: the excess's standard error comes from the truth's noise. Over 400 simulated
    ground truths the z-scores of the excess against the true squared bias have mean ~0 and
    variance ~1 (4 standard errors of each)."""
    rng = np.random.default_rng(1)
    n, N = 300, 10_000
    bias = rng.normal(scale=0.02, size=n)
    sem = np.full(n, 0.01) * rng.uniform(0.5, 1.5, size=n)
    est = rng.normal(size=n)
    true_excess = float(np.mean(bias**2))
    z = []
    for _ in range(400):
        truth = est - bias + sem * rng.normal(size=n)
        score = cj.compare_to_truth(est, truth, sem, N, flops=1.0, forward_flops=1.0)
        z.append((score["excess"] - true_excess) / score["excess_se"])
    z = np.asarray(z)
    assert abs(z.mean()) < 4 / np.sqrt(400) and abs(z.var() - 1) < 4 * np.sqrt(2 / 400)


_SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    import cumjax as cj
    from cumjax import groundtruth as gt
    assert len(jax.devices()) == 4, jax.devices()
    spec = cj.MLPSpec(input_dim=6, width=8, output_dim=4, num_layers=3, activations="relu")
    for B in (3,):  # padded to a multiple of the device count
        params = gt.stack_networks([cj.init_params(jax.random.PRNGKey(i), spec, dtype=jnp.float32)
                                    for i in range(B)])
        g = cj.Gaussian.standard(6, jnp.float32)
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("nets",))
        kw = dict(seed=2, chunk_size=256, block_chunks=2, all_layers=True, second_moments=True, progress=False)
        one = gt.ground_truth(params, spec, g, 3000, **kw)
        many = gt.ground_truth(params, spec, g, 3000, mesh=mesh, **kw)
        for f in ("mean", "sem", "second"):
            for k in spec.labels:
                a, b = np.asarray(getattr(one, f)[k]), np.asarray(getattr(many, f)[k])
                assert a.shape == b.shape and a.shape[0] == B, (a.shape, b.shape)
                # the float32 forward pass runs differently batched matmuls: equal to float32 rounding
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(a).max())
    print("OK")
""")


def test_sharded_over_four_cpu_devices_equals_one_device():
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.path.abspath(ROOT),
    )
    out = subprocess.run([sys.executable, "-c", _SHARDED], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
