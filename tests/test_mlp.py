"""Flax networks, initialisers, parameter conversions and golden files."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from goldens import DATA, golden_files, meta_of

import cumjax as cj
from cumjax.mlp import critical_variances, validate_params

CASES = golden_files("cases")


def test_spec_labels_dims_and_broadcast():
    spec = cj.MLPSpec(3, 5, 2, 3, "tanh")
    assert spec.activations == ("tanh", "tanh") and spec.dims == (3, 5, 5, 2)
    assert spec.labels == ("pre0", "act0", "pre1", "act1", "pre2")
    assert cj.MLPSpec(3, 5, 2, 1).labels == ("pre0",) and cj.MLPSpec(3, 5, 2, 1).dims == (3, 2)
    assert hash(spec) == hash(cj.MLPSpec(3, 5, 2, 3, ("tanh", "tanh")))  # usable as a static jit argument


@pytest.mark.parametrize(
    "act,w_var",
    [
        ("relu", 2.0),
        ("heaviside", 2.0),
        ("gelu", 2.352),
        ("tanh", 2.536),
        ("sigmoid", 3.409),
        ("sgn", 1.0),
        ("square", 1 / 3),
        ("cube", 1 / 15),
        ("abs", 1.0),
    ],
)
def test_he_variances(act, w_var):
    w, b, m = cj.Init(kind="he").resolve(cj.MLPSpec(4, 4, 4, 3, act))
    assert w[0] == 1.0 and b == (0.0,) * 3 and m == (0.0,) * 3
    assert w[1] == pytest.approx(w_var, rel=2e-4) and w[2] == w[1]


def test_he_after_biased_heaviside():
    # 1 / P(N(-3, 1) > 0) = 1 / Phi(-3); the bias mean of layer 1 feeds the heaviside of hidden layer 1
    w, _, _ = cj.Init(kind="he", b_mean=(0.0, -3.0, 0.0)).resolve(cj.MLPSpec(4, 4, 4, 3, ("relu", "heaviside")))
    assert w == pytest.approx((1.0, 2.0, 740.8), rel=1e-4)


@pytest.mark.parametrize(
    "act,q,s_w,s_b",
    # Pennington et al. 2017 (tanh), and q* = 1 for tanh, gelu, relu
    [
        ("tanh", 0.0259, 1.05, 2e-5),
        ("tanh", 0.8214, 2.0, 0.104),
        ("tanh", 1.0, 2.153, 0.151),
        ("gelu", 1.0, 2.194, 0.0672),
        ("relu", 1.0, 2.0, 0.0),
    ],
)
def test_critical_init(act, q, s_w, s_b):
    w, b = critical_variances((act,), q)
    assert w == pytest.approx(s_w, rel=3e-3)
    assert b == pytest.approx(s_b, rel=3e-2, abs=1e-6)
    w_var, b_var, b_mean = cj.Init(kind="critical", q_star=q).resolve(cj.MLPSpec(4, 4, 4, 3, act))
    assert w_var == (q - b, w, w) and b_var == (b, b, b) and b_mean == (0.0,) * 3


@pytest.mark.parametrize(
    "act,q,match",
    [
        ("heaviside", 1.0, "delta"),
        ("sgn", 1.0, "delta"),
        ("sigmoid", 1.0, "infeasible"),
        ("sigmoid", 0.01, "infeasible"),
    ],
)
def test_critical_init_infeasible(act, q, match):
    # step functions have no slope; sigmoid (phi(0) = 1/2) would need a negative bias variance
    with pytest.raises(ValueError, match=match):
        cj.Init(kind="critical", q_star=q).resolve(cj.MLPSpec(4, 4, 4, 3, act))


def test_critical_init_needs_one_activation():
    with pytest.raises(ValueError, match="one activation"):
        cj.Init(kind="critical", q_star=1.0).resolve(cj.MLPSpec(4, 4, 4, 3, ("tanh", "relu")))


def test_init_reproduces_reference_weight_variances_and_biases():
    """Every golden case's Init (he, biased he, critical, manual, the rare-event heaviside) gives the
    reference's init_scale and bias layout."""
    for path in CASES:
        meta = meta_of(path)
        init = cj.Init(kind=meta["init_kind"], **meta["init_params"])
        spec = cj.MLPSpec(
            meta["input_dim"], meta["width"], meta["output_dim"], meta["num_layers"], tuple(meta["nonlin"]), init=init
        )
        w_var = spec.weight_variances
        np.testing.assert_allclose(w_var, meta["init_scale"], rtol=1e-9, err_msg=path)
        assert list(init.bias_layers(spec)) == meta["has_bias"], path


def test_weight_statistics_match_init():
    n = 512
    init = cj.Init(kind="manual", w_var=(1.5, 0.7), b_var=(0.0, 0.25), b_mean=(-0.2, 0.3))
    spec = cj.MLPSpec(n, n, n, 2, "tanh", init=init)
    assert spec.use_bias
    (W0, b0), (W1, b1) = cj.layer_weights(cj.init_params(jax.random.PRNGKey(0), spec))
    # n^2 normals: the sample variance has relative standard error sqrt(2) / n ~ 0.3%; 5 sigma below
    assert (
        float(jnp.var(W0)) * n == pytest.approx(1.5, rel=0.014) and abs(float(jnp.mean(W0))) < 5 * np.sqrt(1.5) / n**1.5
    )
    assert float(jnp.var(W1)) * n == pytest.approx(0.7, rel=0.014)
    np.testing.assert_array_equal(b0, -0.2)  # b_var = 0: a constant bias
    assert float(jnp.mean(b1)) == pytest.approx(0.3, abs=5 * 0.5 / np.sqrt(n))
    assert float(jnp.var(b1)) == pytest.approx(0.25, rel=5 * np.sqrt(2 / n))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_flax_apply_equals_forward_and_round_trip(dtype):
    spec = cj.MLPSpec(5, 7, 3, 3, ("gelu", "abs"), init=cj.Init(b_var=0.1))
    params = cj.init_params(jax.random.PRNGKey(1), spec, dtype=dtype)
    assert all(a.dtype == dtype for a in jax.tree_util.tree_leaves(params))
    assert params["params"]["layer2"]["kernel"].shape == (7, 3) and params["params"]["layer2"]["bias"].shape == (3,)
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 5), dtype)
    apply = jax.jit(cj.MLP(spec).apply, static_argnames="all_layers")
    forward = jax.jit(cj.forward, static_argnums=(1, 3))
    both, mine = apply(params, x, all_layers=True), forward(params, spec, x, True)
    assert sorted(both) == sorted(mine) == sorted(spec.labels)
    for k in spec.labels:
        np.testing.assert_allclose(both[k], mine[k], rtol=1e-6 if dtype == jnp.float32 else 1e-13, atol=1e-7, err_msg=k)
    np.testing.assert_array_equal(apply(params, x), both["pre2"])
    Ws, bs = cj.params_to_arrays(params)
    assert all(isinstance(a, np.ndarray) for a in Ws + bs) and Ws[1].shape == (7, 7)
    back = cj.params_from_arrays(Ws, bs)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
    np.testing.assert_array_equal(forward(back["params"], spec, x, False), both["pre2"])  # the inner dict works too


def test_forward_labels_vmap_and_grad():
    spec = cj.MLPSpec(4, 6, 2, 2, "tanh")
    nets = [cj.init_params(jax.random.PRNGKey(s), spec) for s in range(3)]
    x = jnp.ones(4)
    assert tuple(cj.forward(nets[0], spec, x, all_layers=True)) == spec.labels  # in layer order
    batched = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *nets)
    out = jax.jit(jax.vmap(lambda p: cj.forward(p, spec, x)))(batched)
    np.testing.assert_allclose(out, np.stack([cj.forward(p, spec, x) for p in nets]), rtol=1e-12)
    g = jax.jit(jax.grad(lambda p: jnp.sum(cj.forward(p, spec, x) ** 2)))(nets[0])
    (W0, _), (W1, _) = cj.layer_weights(nets[0])
    h = jnp.tanh(x @ W0)
    np.testing.assert_allclose(g["params"]["layer1"]["kernel"], 2 * jnp.outer(h, h @ W1), rtol=1e-12)


def test_bad_specs_and_inits():
    with pytest.raises(ValueError, match="unknown activation"):
        cj.MLPSpec(4, 4, 4, 2, ("swish",))
    with pytest.raises(ValueError, match="activations"):
        cj.MLPSpec(4, 4, 4, 3, ("relu",))
    with pytest.raises(ValueError, match="num_layers"):
        cj.MLPSpec(4, 4, 4, 0)
    with pytest.raises(ValueError, match="init kind"):
        cj.Init(kind="xavier")
    with pytest.raises(ValueError, match="q_star"):
        cj.Init(kind="critical")
    with pytest.raises(ValueError, match="w_var"):
        cj.Init(kind="he", w_var=2.0)
    with pytest.raises(ValueError, match="one entry per linear layer"):
        cj.Init(kind="manual", w_var=(1.0, 2.0)).resolve(cj.MLPSpec(4, 4, 4, 3, "relu"))
    with pytest.raises(ValueError, match="use_bias"):
        cj.MLPSpec(4, 4, 4, 2, "relu", use_bias=False, init=cj.Init(b_mean=0.1))
    assert cj.MLPSpec(4, 4, 4, 2, "relu", init=cj.Init(b_mean=0.1)).use_bias
    assert cj.MLPSpec(4, 4, 4, 2, "relu").use_bias is False
    crit = cj.Init(kind="critical", q_star=1.0)
    assert cj.MLPSpec(4, 4, 4, 2, "relu", init=crit).use_bias is False  # relu: s_b = 0, no bias needed
    assert cj.MLPSpec(4, 4, 4, 2, "tanh", init=crit).use_bias
    with pytest.raises(TypeError, match="part of the spec"):
        cj.init_params(jax.random.PRNGKey(0), cj.MLPSpec(4, 4, 4, 2, "relu"), cj.Init())
    for bad in (float("nan"), -1.0, (1.0, float("inf"))):
        with pytest.raises(ValueError, match="w_var"):
            cj.Init(kind="manual", w_var=bad)
    with pytest.raises(ValueError, match="b_var"):
        cj.Init(b_var=-0.1)


def test_bad_params_raise():
    spec = cj.MLPSpec(4, 6, 2, 2, "relu", use_bias=True)
    Ws, bs = cj.params_to_arrays(cj.init_params(jax.random.PRNGKey(0), spec))
    with pytest.raises(ValueError, match="layer0 kernel has shape"):
        validate_params(cj.params_from_arrays([Ws[0].T, Ws[1]], bs), spec)
    with pytest.raises(ValueError, match="bias has shape"):
        validate_params(cj.params_from_arrays(Ws, [bs[0][:3], bs[1]]), spec)
    with pytest.raises(ValueError, match="linear layers"):
        validate_params(cj.params_from_arrays(Ws[:1], bs[:1]), spec)
    with pytest.raises(ValueError, match="NaN or Inf"):
        validate_params(cj.params_from_arrays([Ws[0], np.where(Ws[1] > 0, np.inf, Ws[1])], bs), spec)
    with pytest.raises(ValueError, match="layer0"):
        cj.layer_weights({"params": {"dense": {"kernel": Ws[0]}}})


@pytest.mark.parametrize(
    "folder,name",
    [
        ("cases", "p046_relu_n16_L4_k2_simple_bias"),
        ("cases", "p044_lpe_n16_L4_k2_augment"),
        ("kprop", "p053_square_n16_L3_k2_simple"),
    ],
)
def test_load_golden(folder, name):
    spec, params, meta, arrays = cj.load_golden(os.path.join(DATA, folder, name + ".npz"))
    assert spec.labels == tuple(meta["labels"]) and spec.weight_variances == tuple(meta["init_scale"])
    assert spec.use_bias == (folder == "cases")  # the kprop square case has no bias (and no meta has_bias)
    (W0, b0), *_ = cj.layer_weights(params)
    b0 = 0 if b0 is None else np.asarray(b0)
    # the generator's exact facts (k_max >= 2): the first linear layer maps the input Gaussian exactly
    np.testing.assert_allclose(arrays["pre0_K1"], arrays["Kin_1"] @ np.asarray(W0) + b0, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        arrays["pre0_K2"], np.asarray(W0).T @ arrays["Kin_2"] @ np.asarray(W0), rtol=1e-12, atol=1e-14
    )
    assert "meta" not in arrays and "W0" not in arrays and arrays["Kin_2"].shape == (spec.input_dim,) * 2
