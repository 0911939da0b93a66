"""WhestBench adapter: the conversion is exact, k=2 simple is WhestBench's covariance propagation,
the baked ground truth is the converted network's mean, and the evaluation runs end to end."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

wb = pytest.importorskip("whestbench")
import flopscope.numpy as fnp  # noqa: E402  (installed with whestbench)
import whestbench_eval  # noqa: E402  (experiments/, on pytest's pythonpath)

import cumjax as cj  # noqa: E402
from cumjax import whest as cw  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")

EPS64 = np.finfo(np.float64).eps
# k_max=2 simple is checked on every layer against covariance propagation below
VARIANTS = [cj.PropagationConfig(1, "simple"), cj.PropagationConfig(2, "augment"), cj.PropagationConfig(3, "simple")]


@pytest.fixture(scope="module")
def mlp():
    return wb.sample_mlp(24, 4, fnp.random.default_rng(7))


def test_forward_matches_whestbench(mlp):
    # Same float32 weights, float64 arithmetic on both sides: equal up to float64 rounding.
    spec, params = cw.to_cumjax(mlp, jnp.float64)
    x = np.random.default_rng(0).standard_normal((6, 24))
    ours = np.asarray(cw.all_layers(params, spec, jnp.asarray(x)))
    theirs = cw.whest_forward(mlp, x)
    assert ours.shape == theirs.shape == (4, 6, 24)
    assert np.abs(ours - theirs).max() <= 100 * EPS64 * np.abs(theirs).max()
    assert (theirs[-1] >= 0).all() and (theirs[-1] == 0).any()  # a ReLU after the last layer too


@pytest.mark.parametrize("config", VARIANTS, ids=lambda c: c.name)
def test_first_layer_mean_is_exact(config):
    # x ~ N(0, I): pre-activation j is exactly N(0, |W[:, j]|^2), so E[relu] = |W[:, j]| / sqrt(2 pi).
    small = wb.sample_mlp(12, 3, fnp.random.default_rng(3))
    Ws = jnp.asarray(cw.whest_weights(small, np.float64))
    means = np.asarray(cw.jitted_layer_means(config)(Ws))
    assert means.shape == (3, 12) and np.isfinite(means).all()
    exact = np.linalg.norm(np.asarray(Ws[0]), axis=0) / math.sqrt(2 * math.pi)
    np.testing.assert_allclose(means[0], exact, rtol=1e-12)


def test_k2_simple_is_covariance_propagation(mlp, monkeypatch):
    # WhestBench's covariance propagation rounds its ReLU gains to float32; with that cast made a
    # float64 one it is the same closure as cumjax k_max=2 simple, to float64 rounding.
    from whestbench import estimators

    class Float64Numpy:  # flopscope.numpy with float32 read as float64
        float32 = fnp.float64

        def __getattr__(self, name):
            return getattr(fnp, name)

    monkeypatch.setattr(estimators, "fnp", Float64Numpy())
    theirs = np.asarray(estimators.CovariancePropagationEstimator().predict(mlp, 10**12))
    ours = np.asarray(
        cw.jitted_layer_means(cj.PropagationConfig(2, "simple"))(jnp.asarray(cw.whest_weights(mlp, np.float64)))
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)
    # and mean propagation differs: it keeps per-neuron variances where k_max=1 keeps their average
    mean_prop = np.asarray(estimators.MeanPropagationEstimator().predict(mlp, 10**12))
    assert np.abs(mean_prop - ours).max() > 1e-3


def test_estimator_reports_through_flopscope(mlp):
    import flopscope as flops

    est = cw.make_estimator(cj.PropagationConfig(2, "simple"), "float32")
    assert isinstance(est, wb.BaseEstimator) and isinstance(est, cw.CumjaxEstimator)
    with flops.BudgetContext(flop_budget=10**12, quiet=True) as budget:
        pred = est.predict(mlp, 10**12)
    assert budget.flops_used == est.flops(24, 4) > 0  # cumjax's analytic count, charged to the scorer
    np.testing.assert_array_equal(np.asarray(pred), est.predict_numpy(mlp))
    # flopscope prices float64 arithmetic at twice float32, and so does the charge
    est64 = cw.make_estimator(cj.PropagationConfig(2, "simple"), "float64")
    with flops.BudgetContext(flop_budget=10**12, quiet=True) as budget:
        est64.predict(mlp, 10**12)
    assert budget.flops_used == 2 * est64.flops(24, 4)


def test_bad_config_fails_before_work():
    base = dict(width=8, depth=2, n_mlps=2, n_samples=1024, mlp_seeds=[1, 2], variants=[{"k_max": 2}])
    whestbench_eval.check_config(base)
    with pytest.raises(ValueError, match="mlp_seeds"):
        whestbench_eval.check_config({**base, "mlp_seeds": [1]})
    with pytest.raises(ValueError, match="k_max"):
        whestbench_eval.check_config({**base, "variants": [{"k_max": 5}]})
    with pytest.raises(ValueError, match="unknown variant keys"):
        whestbench_eval.check_config({**base, "variants": [{"k_max": 2, "order": 3}]})


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("whest")
    cfg = os.path.join(ROOT, "configs", "whestbench_smoke.json")
    return out, cfg, whestbench_eval.main(["--config", cfg, "--out", str(out)])


def test_smoke_end_to_end_and_resume(smoke, monkeypatch):
    out, cfg, summary = smoke
    rows = summary["rows"]
    assert set(rows) == {
        "cumjax_k1_simple",
        "cumjax_k2_simple",
        "cumjax_k2_augment",
        "whest_mean_propagation",
        "whest_covariance_propagation",
    }
    for name, r in rows.items():
        assert r["final_mse"] > 0 and r["all_mse"] > 0 and r["flops"] > 0 and len(r["per_layer_mse"]) == 3
        if name.startswith("cumjax_"):
            assert r["whest_flops"] == r["flops"]  # the scorer saw cumjax's FLOPs
    # float32 gains vs float64: the two equal closures score alike up to float32 rounding
    assert rows["cumjax_k2_simple"]["final_mse"] == pytest.approx(
        rows["whest_covariance_propagation"]["final_mse"], rel=1e-3
    )
    assert (out / "whestbench_smoke.png").stat().st_size > 0
    # resume: nothing is baked, sampled or scored again
    for fn in ("bake", "score", "layer_variances"):
        monkeypatch.setattr(whestbench_eval, fn, lambda *a, **k: pytest.fail("recomputed on resume"))
    again = whestbench_eval.main(["--config", cfg, "--out", str(out)])
    assert again["rows"] == rows


def test_baked_ground_truth_is_the_converted_networks_mean(smoke):
    # Independent samplers on the same network: WhestBench's baked layer means and cumjax's Monte
    # Carlo on the converted network differ only by sampling noise (z-scores from the measured sem).
    out, cfg, _ = smoke
    c, _ = whestbench_eval.check_config(whestbench_eval.load_config(cfg))
    data, _ = whestbench_eval.load_contest(c, str(out / "whestbench_smoke" / "dataset"))
    m = 2**16
    for i, mlp in enumerate(data.mlps):
        spec, params = cw.to_cumjax(mlp, jnp.float32)
        res = cj.monte_carlo(jax.random.PRNGKey(100 + i), params, spec, cw.whest_input(spec.input_dim), m)
        ours = np.stack([np.asarray(res.mean[f"act{l}"]) for l in range(c["depth"])])
        sem = np.stack([np.asarray(res.sem[f"act{l}"]) for l in range(c["depth"])])
        diff = ours - np.asarray(data.all_layer_targets[i])
        assert (diff[sem == 0] == 0).all()  # a neuron that never fires has mean 0 in both
        z = diff[sem > 0] / (sem[sem > 0] * np.sqrt(1 + m / c["n_samples"]))
        assert np.abs(z).max() < 5.5, np.abs(z).max()  # 48 coordinates: P(max |z| > 5.5) < 2e-6
