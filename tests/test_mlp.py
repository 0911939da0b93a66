"""Flax networks and initialisers."""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cumjax as cj
from cumjax.mlp import critical_variances

GOLDENS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "goldens")


@pytest.mark.parametrize(
    "act,w_var",
    [("relu", 2.0), ("heaviside", 2.0), ("gelu", 2.352), ("tanh", 2.536), ("sigmoid", 3.409), ("sgn", 1.0),
     ("square", 1 / 3), ("cube", 1 / 15), ("abs", 1.0)],
)
def test_he_variances(act, w_var):
    w, _, _ = cj.Init(kind="he").resolve(cj.MLPSpec(4, 4, 4, 3, (act, act)))
    assert w[0] == 1.0
    assert w[1] == pytest.approx(w_var, rel=2e-4) and w[2] == pytest.approx(w_var, rel=2e-4)


def test_he_after_biased_heaviside():
    # 1 / P(N(-3, 1) > 0) = 1 / Phi(-3)
    w, _, _ = cj.Init(kind="he", b_mean=(0.0, -3.0, 0.0)).resolve(cj.MLPSpec(4, 4, 4, 3, ("relu", "heaviside")))
    assert w[2] == pytest.approx(740.8, rel=1e-4)


@pytest.mark.parametrize(
    "act,q,s_w,s_b",
    # Pennington et al. (tanh) and the reference's values at q* = 1.
    [("tanh", 0.0259, 1.05, 2e-5), ("tanh", 0.8214, 2.0, 0.104), ("tanh", 1.0, 2.153, 0.151), ("gelu", 1.0, 2.194, 0.0672), ("relu", 1.0, 2.0, 0.0)],
)
def test_critical_init(act, q, s_w, s_b):
    w, b = critical_variances((act,), q)
    assert w == pytest.approx(s_w, rel=2e-3)
    assert b == pytest.approx(s_b, rel=3e-2, abs=1e-6)
    spec = cj.MLPSpec(4, 4, 4, 3, (act, act), use_bias=True)
    w_var, b_var, _ = cj.Init(kind="critical", q_star=q).resolve(spec)
    assert w_var == (q - b, w, w) and b_var == (b, b, b)


@pytest.mark.parametrize("act,match", [("heaviside", "delta"), ("sgn", "delta"), ("sigmoid", "infeasible")])
def test_critical_init_infeasible(act, match):
    # step functions have no slope; sigmoid at q* = 1 would need a negative bias variance
    with pytest.raises(ValueError, match=match):
        critical_variances((act,), 1.0)


def test_weight_statistics_match_init():
    n = 512
    spec = cj.MLPSpec(n, n, n, 2, ("tanh",), use_bias=True)
    init = cj.Init(kind="manual", w_var=(1.5, 0.7), b_var=0.25, b_mean=0.3)
    params = cj.init_params(jax.random.PRNGKey(0), spec, init)
    (W0, b0), (W1, b1) = cj.layer_weights(params)
    # sample variance of n^2 normals has relative standard error sqrt(2 / n^2) ~ 0.3%
    assert float(jnp.var(W0)) * n == pytest.approx(1.5, rel=0.015)
    assert float(jnp.var(W1)) * n == pytest.approx(0.7, rel=0.015)
    assert float(jnp.mean(b1)) == pytest.approx(0.3, abs=4 * 0.5 / np.sqrt(n))
    assert float(jnp.var(b1)) == pytest.approx(0.25, rel=4 * np.sqrt(2 / n))


def test_flax_apply_equals_forward_and_round_trip():
    spec = cj.MLPSpec(5, 7, 3, 3, ("gelu", "abs"), use_bias=True)
    init = cj.Init(b_var=0.1)
    params = cj.init_params(jax.random.PRNGKey(1), spec, init)
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 5))
    module = cj.MLP(spec, *init.resolve(spec))
    np.testing.assert_allclose(module.apply(params, x), cj.forward(params, spec, x), rtol=1e-12)
    both = module.apply(params, x, all_layers=True)
    assert list(both) == list(spec.labels)
    Ws, bs = cj.params_to_arrays(params)
    back = cj.params_from_arrays(Ws, bs)
    np.testing.assert_allclose(cj.forward(back, spec, x), cj.forward(params, spec, x), rtol=0)


def test_bad_specs():
    with pytest.raises(ValueError, match="unknown activation"):
        cj.MLPSpec(4, 4, 4, 2, ("swish",))
    with pytest.raises(ValueError, match="activations"):
        cj.MLPSpec(4, 4, 4, 3, ("relu",))
    with pytest.raises(ValueError, match="use_bias"):
        cj.init_params(jax.random.PRNGKey(0), cj.MLPSpec(4, 4, 4, 2, ("relu",)), cj.Init(b_mean=0.1))
    with pytest.raises(ValueError, match="init kind"):
        cj.Init(kind="xavier")


@pytest.mark.skipif(not glob.glob(os.path.join(GOLDENS, "cases", "*.npz")), reason="goldens absent")
def test_load_golden():
    spec, params, scale, meta, arrays = cj.load_golden(os.path.join(GOLDENS, "cases", "p046_relu_n16_L4_k2_simple_bias.npz"))
    assert spec.num_layers == 4 and spec.use_bias and len(cj.layer_weights(params)) == 4
    pre0 = arrays["Kin_1"] @ np.asarray(cj.layer_weights(params)[0][0]) + np.asarray(cj.layer_weights(params)[0][1])
    np.testing.assert_allclose(pre0, arrays["pre0_K1"], rtol=1e-12)
