"""Training through the estimator (cumjax.train, experiments/distill.py)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cumjax as cj
from cumjax import train as tr

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _square_net():
    """One hidden layer x -> (x W0 + b0)^2 -> . W1 + b1 on a non-standard Gaussian input (float64)."""
    d, n, o = 5, 7, 3
    spec = cj.MLPSpec(d, n, o, 2, ("square",), init=cj.Init(kind="manual", w_var=1.0, b_var=0.3))
    params = cj.init_params(jax.random.PRNGKey(0), spec)
    a = jax.random.normal(jax.random.PRNGKey(3), (d, d))
    g = cj.Gaussian(jnp.linspace(-0.5, 0.5, d), a @ a.T / d + 0.5 * jnp.eye(d))
    target = tr.Moments(jnp.array([0.3, -1.0, 2.0]), jnp.eye(o) + 0.2)
    return spec, params, g, target


def _square_closed_form(params, g):
    """Exact output moments: Z = x W0 + b0 ~ N(m, S), E[Z_i^2] = m_i^2 + S_ii,
    Cov(Z_i^2, Z_j^2) = 2 S_ij^2 + 4 m_i m_j S_ij (Isserlis), then the linear output layer."""
    (W0, b0), (W1, b1) = cj.layer_weights(params)
    m, S = g.mean @ W0 + b0, W0.T @ g.cov @ W0
    act_mean, act_cov = m**2 + jnp.diag(S), 2 * S**2 + 4 * jnp.outer(m, m) * S
    return tr.Moments(act_mean @ W1 + b1, W1.T @ act_cov @ W1)


# Where propagation is exact on this network (checked against the closed form): the mean from
# k_max = 2 on, the covariance at k_max = 2 augmented (its 2 S_ij^2 term is a two-edge diagram that
# the simple k_max = 2 term set drops) and from k_max = 3 on.
@pytest.mark.parametrize("k_max,kind", [(2, "augment"), (3, "simple")])
def test_estimated_loss_and_gradient_equal_closed_form(k_max, kind):
    spec, params, g, target = _square_net()
    config = cj.PropagationConfig(k_max=k_max, kind=kind)
    exact = jax.value_and_grad(lambda p: tr.moment_loss(_square_closed_form(p, g), target))
    est = jax.jit(jax.value_and_grad(lambda p: tr.estimated_loss(p, spec, g, config, target)))
    (v_est, g_est), (v_exact, g_exact) = est(params), exact(params)
    assert float(v_est) == pytest.approx(float(v_exact), rel=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(g_est), jax.tree_util.tree_leaves(g_exact)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("k_max,kind", [(1, "simple"), (2, "augment")])
def test_gradient_matches_finite_differences(k_max, kind):
    spec = cj.MLPSpec(4, 6, 2, 3, "relu", init=cj.Init(kind="he", b_var=0.2))
    params = cj.init_params(jax.random.PRNGKey(1), spec)
    g = cj.Gaussian(jnp.full(4, 0.1), jnp.eye(4))
    target = tr.Moments(jnp.array([0.5, -0.5]), 0.5 * jnp.eye(2))
    value_and_grad = jax.jit(
        jax.value_and_grad(
            lambda p: tr.estimated_loss(p, spec, g, cj.PropagationConfig(k_max=k_max, kind=kind), target)
        )
    )
    loss = lambda p: value_and_grad(p)[0]  # noqa: E731  (one compilation for values and gradient)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    v = jax.tree_util.tree_unflatten(tree, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    h = 1e-5  # central differences: truncation ~h^2 |L'''| ~ 1e-10, rounding ~eps L / h ~ 1e-11
    shift = lambda s: jax.tree_util.tree_map(lambda p, d: p + s * h * d, params, v)  # noqa: E731
    fd = (float(loss(shift(1))) - float(loss(shift(-1)))) / (2 * h)
    g = value_and_grad(params)[1]
    directional = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(v)))
    assert fd == pytest.approx(directional, rel=1e-6, abs=1e-8)


def test_sampled_and_monte_carlo_losses_are_unbiased():
    """On the square network the true loss L is known in closed form. The mean
    of many split-half minibatch losses (batch 8, where the plug-in loss would be biased by
    ~tr(Cov)/8) and the grouped Monte Carlo U-statistic must both agree with L within 4 SE."""
    spec, params, g, target = _square_net()
    exact = float(tr.moment_loss(_square_closed_form(params, g), target))
    keys = jax.random.split(jax.random.PRNGKey(7), 20000)
    batch_losses = jax.jit(jax.vmap(lambda k: tr.sampled_loss(params, spec, tr.gaussian_batch(k, g, 8), target)))(keys)
    se = float(jnp.std(batch_losses) / np.sqrt(len(keys)))
    assert abs(float(jnp.mean(batch_losses)) - exact) < 4 * se
    plug_in = jax.jit(
        jax.vmap(
            lambda k: tr.moment_loss(tr.sample_moments(cj.forward(params, spec, tr.gaussian_batch(k, g, 8))), target)
        )
    )(keys)
    assert abs(float(jnp.mean(plug_in)) - exact) > 4 * se  # the bias the split-half form removes is visible
    value, value_se = tr.monte_carlo_loss(
        jax.random.PRNGKey(8), params, spec, g, target, 2**15, groups=8, chunk_size=4096
    )
    assert abs(value - exact) < 4 * value_se


def _tiny_problem():
    spec = cj.MLPSpec(4, 8, 2, 3, "relu", init=cj.Init(kind="he", b_var=0.1))
    teacher = cj.init_params(jax.random.PRNGKey(10), spec, dtype=jnp.float32)
    student = cj.init_params(jax.random.PRNGKey(11), spec, dtype=jnp.float32)
    g = cj.Gaussian.standard(4, jnp.float32)
    # same sample count and groups as the evaluations below: one compiled sampler serves both
    m = tr.monte_carlo_moments(jax.random.PRNGKey(12), teacher, spec, g, 2**15, groups=8, chunk_size=4096)
    data = tr.MomentProblem(tr.Moments(m.mean.mean(0).astype(jnp.float32), m.cov.mean(0).astype(jnp.float32)), g)

    def evaluate(p, step):  # independent samples at every checkpoint
        return tr.monte_carlo_loss(
            jax.random.fold_in(jax.random.PRNGKey(13), step), p, spec, g, data.target, 2**15, groups=8, chunk_size=4096
        )

    return spec, student, data, evaluate


def test_training_through_estimator_reduces_monte_carlo_loss():
    spec, student, data, evaluate = _tiny_problem()
    _, curve = tr.fit(
        tr.estimated_objective(spec, cj.PropagationConfig(k_max=2)),
        student,
        optax.adam(0.02),
        40,
        key=jax.random.PRNGKey(0),
        data=data,
        eval_every=40,
        evaluate=evaluate,
    )
    first, last = curve[0], curve[-1]
    drop = first["eval_loss"] - last["eval_loss"]
    assert drop > 5 * np.hypot(first["eval_se"], last["eval_se"])  # independent evaluations
    assert last["eval_loss"] < 0.5 * first["eval_loss"]


def test_resume_after_interruption_reproduces_the_curve(tmp_path):
    spec, student, data, evaluate = _tiny_problem()
    kwargs = dict(
        key=jax.random.PRNGKey(1), data=data, eval_every=5, evaluate=evaluate, flops_per_step=10.0, meta={"run": "t"}
    )
    objective, opt = tr.sampled_objective(spec, 16), optax.adam(0.02)
    params_full, full = tr.fit(objective, student, opt, 15, checkpoint=str(tmp_path / "a.msgpack"), **kwargs)

    class Interrupt(Exception):
        pass

    def stop_at_10(step):
        if step == 10:
            raise Interrupt

    path = str(tmp_path / "b.msgpack")
    with pytest.raises(Interrupt):
        tr.fit(objective, student, opt, 15, checkpoint=path, on_checkpoint=stop_at_10, **kwargs)
    seen = []
    params_resumed, resumed = tr.fit(objective, student, opt, 15, checkpoint=path, on_checkpoint=seen.append, **kwargs)
    assert seen == [15]  # only the last segment ran
    assert resumed == full
    for a, b in zip(jax.tree_util.tree_leaves(params_resumed), jax.tree_util.tree_leaves(params_full)):
        np.testing.assert_array_equal(a, b)
    assert [r["flops"] for r in full] == [0.0, 50.0, 100.0, 150.0]
    # a checkpoint of a different run is not resumed
    _, other = tr.fit(objective, student, opt, 15, checkpoint=path, **dict(kwargs, meta={"run": "other"}))
    assert other == full


def test_distill_smoke_end_to_end_and_resume(tmp_path, monkeypatch):
    import distill

    config = os.path.join(ROOT, "configs", "distill_smoke.json")
    result = distill.main(["--config", config, "--out", str(tmp_path)])
    cfg = json.load(open(config))
    saved = json.loads((tmp_path / "distill_smoke.json").read_text())
    assert (tmp_path / "distill_smoke.png").stat().st_size > 0
    for name in cfg["estimators"]:
        row = saved["summary"][name]
        assert row["mc"]["batch"] >= 4 and row["est"]["flops_per_step"] > 0
        for s in cfg["seeds"]:
            curve = saved["entries"][f"est_{name}/s{s}"]["curve"]
            assert len(curve) == cfg["steps"] // cfg["eval_every"] + 1
            assert curve[-1]["flops"] == pytest.approx(cfg["steps"] * row["est"]["flops_per_step"])
    # equal FLOPs per step, up to rounding the batch to an even size
    e = saved["entries"]["flops"]
    for f in e["estimators"].values():
        assert abs(f["mc_step_flops"] - f["grad_flops"]) <= e["mc_per_sample"]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was recomputed")

    monkeypatch.setattr(tr, "fit", no_training)
    again = distill.main(["--config", config, "--out", str(tmp_path)])
    assert again["entries"] == result["entries"]


def test_distill_rejects_bad_config(tmp_path):
    import distill

    cfg = json.load(open(os.path.join(ROOT, "configs", "distill_smoke.json")))
    cfg["estimators"] = ["k5_simple"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="k<1-4>"):
        distill.main(["--config", str(path), "--out", str(tmp_path)])
