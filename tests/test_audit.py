"""Auditing through the estimator: minimal perturbations, estimator vs Monte Carlo gradients, and
the audit experiment end to end."""

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy import stats

import cumjax as cj
from cumjax import audit, importance, tails

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_minimal_perturbation_reaches_closed_form_and_monte_carlo_confirms():
    """Thresholding pre0 = x W0 (exactly Gaussian): P(z_i > t) = Phi(-t / |w_i|), so the smallest
    perturbation reaching probability p* stretches column i to t / Phi^-1(1 - p*): relative norm
    (r* - |w_i|) / |W0|_F. The search (estimator gradients only) must find it, and sampling the
    perturbed network must agree with the target within 4 standard errors."""
    n, i, t = 8, 2, 2.0
    spec = cj.MLPSpec(n, n, n, 1, ())
    params = cj.init_params(jax.random.PRNGKey(0), spec)
    W = params["params"]["layer0"]["kernel"]
    g = cj.Gaussian.standard(n)

    def tail(kernels):
        p = audit.replace_kernels(params, kernels)
        return tails.tail_probabilities(p, spec, g, 0, jnp.array([t]), cj.PropagationConfig(k_max=1), neurons=[i])[0, 0]

    col = float(jnp.linalg.norm(W[:, i]))
    before = float(tail([W]))
    assert before == pytest.approx(stats.norm.sf(t / col), rel=1e-12)
    target = 5 * before
    res = audit.minimal_perturbation(tail, [W], target, steps=100, learning_rate=0.02)
    optimum = (t / stats.norm.isf(target) - col) / float(jnp.linalg.norm(W))
    assert res.value >= target
    assert optimum * (1 - 1e-6) <= res.relative_norm <= optimum * 1.01
    mc = tails.tail_monte_carlo(
        jax.random.PRNGKey(1),
        audit.replace_kernels(params, res.kernels),
        spec,
        g,
        0,
        jnp.full((1, n), t),
        2**17,
        chunk_size=8192,
    )
    assert abs(mc.mean[0, i] - target) < 4 * mc.sem[0, i]
    assert mc.mean[0, i] - before > 10 * mc.sem[0, i]  # and the change itself is resolved


@pytest.mark.slow
def test_minimal_perturbation_raises_a_deep_tail():
    """Two ReLU layers: the estimate reaches the target and sampling confirms the rise."""
    n = 8
    spec = cj.MLPSpec(n, n, n, 3, ("relu", "relu"))
    params = cj.init_params(jax.random.PRNGKey(3), spec)
    g = cj.Gaussian.standard(n)
    kernels = [W for W, _ in cj.layer_weights(params)]
    t = 2.5

    def tail(k):
        p = audit.replace_kernels(params, k)
        return tails.tail_probabilities(p, spec, g, 2, jnp.array([t]), cj.PropagationConfig(2, "simple"), neurons=[0])[
            0, 0
        ]

    before = float(tail(kernels))
    res = audit.minimal_perturbation(tail, kernels, 4 * before, steps=40, learning_rate=0.02, polish_steps=2)
    assert res.value >= 4 * before and 0 < res.relative_norm < 1
    rows = jnp.full((1, n), t)
    p0 = tails.tail_monte_carlo(jax.random.PRNGKey(4), params, spec, g, 2, rows, 2**16, chunk_size=8192)
    p1 = tails.tail_monte_carlo(
        jax.random.PRNGKey(5), audit.replace_kernels(params, res.kernels), spec, g, 2, rows, 2**16, chunk_size=8192
    )
    assert p1.mean[0, 0] - p0.mean[0, 0] > 4 * np.hypot(p0.sem[0, 0], p1.sem[0, 0])


def _one_hidden_layer():
    """One ReLU layer: pre0 is exactly Gaussian, so the estimated output mean (any k_max) and its
    gradient are exact, and only the Monte Carlo side is noisy."""
    n = 8
    spec = cj.MLPSpec(n, n, 3, 2, ("relu",), init=cj.Init(kind="he", b_var=0.1))
    params = cj.init_params(jax.random.PRNGKey(7), spec)
    A = jax.random.normal(jax.random.PRNGKey(8), (n, n)) / np.sqrt(n)
    return spec, params, cj.Gaussian(jnp.linspace(-0.5, 0.5, n), A @ A.T + 0.5 * jnp.eye(n))


def test_estimator_gradient_agrees_with_pathwise_monte_carlo():
    """Hotelling's T^2 on 12 coordinates (full sample covariance, F(K, N - K) under equality) and
    a Bonferroni bound on every coordinate's z-score; the same test rejects a gradient 5% off."""
    spec, params, gauss = _one_hidden_layer()
    c = jnp.array([0.3, -1.0, 0.5])
    g = np.asarray(ravel_pytree(audit.estimate_gradient(params, spec, gauss, cj.PropagationConfig(k_max=2), c))[0])
    probe = np.sort(np.asarray(jax.random.choice(jax.random.PRNGKey(9), g.size, (12,), replace=False)))
    pg = audit.pathwise_gradient(jax.random.PRNGKey(10), params, spec, gauss, c, 2**14, probe, chunk_size=4096)
    mc, se = (np.asarray(ravel_pytree(x)[0]) for x in (pg.mean, pg.sem))
    ht = audit.hotelling_test(g[probe], mc[probe], pg.probe_cov, pg.num_samples)
    assert ht["p_value"] > 1e-3, ht
    live = se > 1e-9 * np.abs(mc).max()  # the output bias's gradient is the constant c in every sample
    np.testing.assert_allclose(g[~live], mc[~live], rtol=1e-12)
    z = (g[live] - mc[live]) / se[live]
    assert np.all(np.abs(z) < stats.norm.isf(1e-3 / (2 * live.sum()))), np.abs(z).max()
    assert audit.hotelling_test(1.05 * g[probe], mc[probe], pg.probe_cov, pg.num_samples)["p_value"] < 1e-6


def test_audit_smoke_end_to_end_and_resume(tmp_path, monkeypatch):
    script = importlib.import_module("audit")  # experiments/audit.py (on pytest's pythonpath)

    cfg = os.path.join(ROOT, "configs", "audit_smoke.json")
    script.main(["--config", cfg, "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "audit_smoke.json").read_text())
    for suffix in ("search", "sensitivity", "gradients"):
        assert (tmp_path / f"audit_smoke_{suffix}.png").stat().st_size > 0
    s = saved["entries"]["search"]
    assert s["estimate_after"] >= s["target"] * (1 - 1e-9) and s["relative_norm"] > 0
    assert set(saved["entries"]["gradient_check"]) == {"k1_simple", "k2_simple"}

    def boom(*a, **k):
        raise AssertionError("resumed run recomputed")

    for name in (
        "tail_importance_sampling",
        "tail_monte_carlo",
        "minimal_perturbation",
        "pathwise_gradient",
        "estimate_gradient",
    ):
        for module in (audit, tails, importance, script):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, boom)
    again = script.main(["--config", cfg, "--out", str(tmp_path)])
    assert again["entries"]["search"] == saved["entries"]["search"]
    assert again["entries"]["gradient_check"] == saved["entries"]["gradient_check"]
