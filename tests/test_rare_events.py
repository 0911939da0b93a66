"""Tail probabilities: thresholded networks, the heaviside goldens, importance sampling, estimate
vs Monte Carlo, and the rare_events experiment end to end."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from goldens import golden_files
from scipy import stats

import cumjax as cj
from cumjax import importance, propagation, tails

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _net(width, layers, seed=0, bias=False):
    spec = cj.MLPSpec(
        width, width, width, layers, ("relu",) * (layers - 1), init=cj.Init(kind="he", b_var=0.1 if bias else 0.0)
    )
    return spec, cj.init_params(jax.random.PRNGKey(seed), spec)


@pytest.mark.parametrize("neurons", [None, [3, 0, 5]])
def test_thresholded_network_outputs_the_indicator(neurons):
    spec, params = _net(8, 3, bias=True)
    t = jnp.linspace(-0.5, 1.0, 8)  # per-neuron thresholds
    tparams = tails.threshold_params(params, 1, t, neurons)
    tspec = tails.thresholded_spec(spec, 1, None if neurons is None else len(neurons))
    x = jax.random.normal(jax.random.PRNGKey(1), (2000, 8))
    z = cj.forward(params, spec, x, all_layers=True)["pre1"]
    want = (z > t).astype(z.dtype)
    want = want if neurons is None else want[:, np.asarray(neurons)]
    got = cj.forward(tparams, tspec, x)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # the pytree has exactly the structure of the Flax module for that spec
    module = cj.init_params(jax.random.PRNGKey(0), tspec)
    assert jax.tree_util.tree_structure(module) == jax.tree_util.tree_structure(tparams)


def test_thresholded_spec_rejects_bad_layers():
    spec, _ = _net(8, 3)
    with pytest.raises(ValueError, match="layer"):
        tails.thresholded_spec(spec, 3)
    odd = cj.MLPSpec(8, 8, 4, 3, ("relu", "relu"))
    with pytest.raises(ValueError, match="hidden width"):
        tails.thresholded_spec(odd, 2)


LPE = [p for p in golden_files("cases") if "_lpe_" in p]


@pytest.mark.parametrize("path", [p if "_k1_" in p else pytest.param(p, marks=pytest.mark.slow) for p in LPE])
def test_tail_probabilities_match_heaviside_goldens(path):
    """The goldens' rare-event network is relu, relu, heaviside with bias -2 on pre2: built from
    its ReLU part by threshold_params(t = 2), its act2 mean is our tail estimate."""
    spec, params, meta, arrays = cj.load_golden(path)
    layers = cj.layer_weights(params)
    assert spec.activations == ("relu", "relu", "heaviside") and np.allclose(layers[2][1], -2.0)
    relu = cj.params_from_arrays([W for W, _ in layers[:3]], [layers[0][1], layers[1][1], layers[2][1] + 2.0])
    relu_spec = cj.MLPSpec(spec.input_dim, spec.width, spec.width, 3, ("relu", "relu"), use_bias=True)
    config = cj.PropagationConfig(k_max=meta["k_max"], kind=meta["kind"].lower(), factored=meta["factor"])
    g = cj.Gaussian(jnp.asarray(arrays["Kin_1"]), jnp.asarray(arrays["Kin_2"]))
    got = tails.tail_probabilities(relu, relu_spec, g, 2, jnp.array([2.0]), config)
    want = arrays["act2_K1"]
    assert np.abs(np.asarray(got[0]) - want).max() <= 1e-9 * np.abs(want).max() + 1e-12


def test_lpe_goldens_present():
    assert len(LPE) >= 3


@pytest.mark.parametrize("k_max", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_first_layer_tail_is_exact(k_max):
    """z = pre0 is exactly Gaussian, N(mu W + b, w_i . w_i): every order gives the normal tail."""
    spec, params = _net(6, 2, seed=3, bias=True)
    mu = jnp.linspace(-0.3, 0.4, 6)
    W, b = cj.layer_weights(params)[0]
    ts = jnp.array([[-0.5], [0.7], [2.5]]) * jnp.ones((1, 6))
    got = tails.tail_probabilities(params, spec, cj.Gaussian(mu, jnp.eye(6)), 0, ts, cj.PropagationConfig(k_max=k_max))
    m, s = np.asarray(mu @ W + b), np.sqrt(np.sum(np.asarray(W) ** 2, axis=0))
    want = stats.norm.sf((np.asarray(ts) - m) / s)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-15)


@pytest.mark.slow  # the smoke test below also checks IS against plain sampling
@pytest.mark.parametrize("bias", [False, True])
def test_importance_sampling_agrees_with_plain_monte_carlo(bias):
    """Both estimators are unbiased: at thresholds plain sampling resolves (p ~ 1e-2..1e-3) their
    difference is within 4 combined standard errors. Without biases the IS path integrates the
    radius exactly; with biases (not homogeneous) it uses indicators."""
    spec, params = _net(16, 3, seed=1, bias=bias)
    g = cj.Gaussian.standard(16)
    assert importance.is_homogeneous(params, spec, 2, g) == (not bias)
    neurons = np.array([0, 1, 2])
    z = cj.forward(params, spec, jax.random.normal(jax.random.PRNGKey(2), (2**14, 16)), all_layers=True)["pre2"]
    ts = np.array([np.quantile(z[:, i], 1 - q) for i, q in zip(neurons, (1e-2, 5e-3, 2e-3))])
    rows = np.full((3, 16), np.inf)
    rows[np.arange(3), neurons] = ts
    plain = tails.tail_monte_carlo(jax.random.PRNGKey(3), params, spec, g, 2, rows, 2**18, chunk_size=8192)
    p_plain, se_plain = plain.mean[np.arange(3), neurons], plain.sem[np.arange(3), neurons]
    est, _ = importance.tail_importance_sampling(
        jax.random.PRNGKey(4),
        params,
        spec,
        g,
        2,
        neurons,
        ts,
        8192,
        pilot_samples=8192,
        ce_samples=2048,
        ce_iterations=3,
        chunk_size=4096,
    )
    assert np.all(p_plain * 2**18 > 100)  # resolvable
    assert np.all(est.sem < 0.5 * est.mean)  # a useful estimate
    z = (est.mean - p_plain) / np.sqrt(est.sem**2 + se_plain**2)
    assert np.all(np.abs(z) < 4), z


def test_radial_tail_closed_form():
    """P(R g > t), R ~ chi_d, against scipy's chi distribution, for every sign of g and t."""
    d, chi = 5, stats.chi(5)
    cases = [
        (0.7, 1.5, chi.sf(1.5 / 0.7)),
        (-0.4, 1.5, 0.0),
        (0.0, 1.5, 0.0),
        (0.7, -0.8, 1.0),
        (-0.4, -0.8, chi.cdf(0.8 / 0.4)),
        (0.0, -0.8, 1.0),
    ]
    for g, t, want in cases:
        got = float(importance._radial_tail(jnp.asarray(g), jnp.asarray(t), d))
        assert got == pytest.approx(want, rel=1e-10, abs=1e-300), (g, t)


@pytest.mark.slow
def test_estimate_agrees_with_monte_carlo_at_moderate_probability():
    """k2 augment vs 2^18 samples at p ~ 0.02-0.2 over the 64 neurons of a width-64 net.

    Squared error averaged over neurons (the quantity the truncation theory controls) must stay
    below the sampling part, mean(SE^2) times the 1 - 1e-4 quantile of chi2_64 / 64, plus the
    truncation part, estimated by the size of the diagram tier the augmented set adds over the
    simple one (mean (augment - simple)^2; omitted tiers are smaller by powers of width^-1/2)."""
    n = 64
    spec, params = _net(n, 3, seed=5)
    g = cj.Gaussian.standard(n)
    mc = cj.monte_carlo(jax.random.PRNGKey(6), params, spec, g, 8192)
    ts = np.asarray(mc.mean["pre2"])[None] + np.array([[1.0], [2.0]]) * np.asarray(mc.sem["pre2"])[None] * np.sqrt(8192)
    truth = tails.tail_monte_carlo(jax.random.PRNGKey(7), params, spec, g, 2, ts, 2**18, chunk_size=8192)
    aug = np.asarray(tails.tail_probabilities(params, spec, g, 2, ts, cj.PropagationConfig(2, "augment")))
    simple = np.asarray(tails.tail_probabilities(params, spec, g, 2, ts, cj.PropagationConfig(2, "simple")))
    q = stats.chi2.ppf(1 - 1e-4, n) / n
    for j in range(2):  # per threshold level
        mse = np.mean((aug[j] - truth.mean[j]) ** 2)
        allowed = q * np.mean(truth.sem[j] ** 2) + np.mean((aug[j] - simple[j]) ** 2)
        assert mse <= allowed, (j, mse, allowed)
        # not vacuous: the allowance is a small fraction of the probabilities themselves
        assert np.sqrt(allowed) < 0.3 * np.median(truth.mean[j])


def test_rare_events_smoke_end_to_end_and_resume(tmp_path, monkeypatch):
    import rare_events

    cfg = os.path.join(ROOT, "configs", "rare_events_smoke.json")
    first = rare_events.main(["--config", cfg, "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "rare_events_smoke.json").read_text())
    assert (tmp_path / "rare_events_smoke.png").stat().st_size > 0
    rows = saved["summary"]["rows"]
    assert {r["estimator"] for r in rows} == {"k1_simple", "k2_simple"}
    assert all(r["flops"] > 0 and r["mc_samples"] >= 2 for r in rows)
    v = saved["summary"]["validation"]
    assert v["compared"] >= 4 and v["max_abs_z"] < 4  # importance sampling vs plain sampling, both unbiased

    tail_monte_carlo, tail_flops = tails.tail_monte_carlo, tails.tail_flops

    def boom(*a, **k):
        raise AssertionError("resumed run recomputed sampled work")

    for name in ("tail_importance_sampling", "tail_monte_carlo", "tail_flops"):
        for module in (tails, importance, rare_events):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, boom)
    again = rare_events.main(["--config", cfg, "--out", str(tmp_path)])
    assert again["entries"].keys() == first["entries"].keys()
    assert again["summary"] == first["summary"]
    # an estimator added to the config: only it runs (the sampled work above is still forbidden
    # apart from its own equal-FLOP Monte Carlo), the other rows stay as they were
    monkeypatch.setattr(tails, "tail_monte_carlo", tail_monte_carlo)
    monkeypatch.setattr(tails, "tail_flops", tail_flops)
    more = json.loads(open(cfg).read())
    more["estimators"] += [{"k_max": 2, "kind": "augment"}, {"k_max": 3, "kind": "simple"}]
    (tmp_path / "more.json").write_text(json.dumps(more))
    check = propagation.check_memory

    def guard(width, layers, config, itemsize):  # k3 refused by the memory guard: skipped, not stored
        if config.k_max == 3:
            raise MemoryError("refused")
        check(width, layers, config, itemsize)

    monkeypatch.setattr(propagation, "check_memory", guard)
    grown = rare_events.main(["--config", str(tmp_path / "more.json"), "--out", str(tmp_path)])
    assert grown["entries"].keys() == first["entries"].keys() | {"est_k2_augment"}
    got = {r["estimator"]: r for r in grown["summary"]["rows"]}
    assert got.keys() == {"k1_simple", "k2_simple", "k2_augment"}
    for r in first["summary"]["rows"]:
        assert got[r["estimator"]] == r


def test_per_decade_groups_pairs_by_true_probability():
    import rare_events

    truth = np.array([[2e-3, 3e-3, 5e-3, 2e-5], [4e-5, 6e-5, 8e-5, 0.0]])
    est = truth * np.array([[1.1, 1.1, 1.1, 0.5], [0.5, 0.5, 0.5, 1.0]])
    se = 0.1 * truth
    se[0, 2] = 0.5 * truth[0, 2]  # an unreliable ground truth is left out
    rows = {r["p_low"]: r for r in rare_events.per_decade(est, truth, se)}
    assert set(rows) == {1e-5}  # [1e-3, 1e-2) keeps only 2 reliable pairs (< 3); p = 0 never counts
    assert rows[1e-5]["pairs"] == 4 and rows[1e-5]["rel_err_median"] == pytest.approx(0.5)
    assert rows[1e-5]["signed_rel_err_median"] == pytest.approx(-0.5)
