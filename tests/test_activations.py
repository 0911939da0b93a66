"""Gaussian expectations E[d^k phi(Z)^p] against independent numerical integration and calculus identities."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.polynomial import hermite_e
from scipy import integrate, special

from cumjax.activations import ACTIVATIONS, activation_fn, gaussian_expectation, squared_slope_expectation

jax.config.update("jax_enable_x64", True)

# Independent numpy versions of the activations and their (classical) derivatives.
NP_FORWARD = {
    "relu": lambda z: np.maximum(z, 0.0),
    "gelu": lambda z: z * special.ndtr(z),
    "sigmoid": special.expit,
    "tanh": np.tanh,
    "abs": np.abs,
    "sgn": np.sign,
    "square": lambda z: z * z,
    "cube": lambda z: z * z * z,
    "heaviside": lambda z: np.where(z > 0, 1.0, 0.0),
}
NP_SLOPE = {
    "relu": lambda z: float(z > 0),
    "gelu": lambda z: special.ndtr(z) + z * math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi),
    "sigmoid": lambda z: special.expit(z) * (1 - special.expit(z)),
    "tanh": lambda z: 1 - math.tanh(z) ** 2,
    "abs": np.sign,
    "square": lambda z: 2 * z,
    "cube": lambda z: 3 * z * z,
}
QUADRATURE = ("gelu", "sigmoid", "tanh")
POINTS = [(0.0, 1.0), (0.4, 0.3), (-0.7, 2.5)]
# Measured worst relative error (max(1, |value|) scale) of the 100-node rule over k <= 5, p <= 4 at
# POINTS: gelu 5e-10, sigmoid 2e-13, tanh 6e-6 (poles at +-i pi/2 limit convergence as var grows).
TOL = {"gelu": 3e-9, "sigmoid": 1e-11, "tanh": 2e-5}
CLOSED_FORM_TOL = 1e-10


def _quad(f, lo, hi, breaks=(0.0,)):
    """quad over [lo, hi], split at the kinks/jumps so each piece is smooth."""
    pts = sorted({lo, hi, *(b for b in breaks if lo < b < hi)})
    with warnings.catch_warnings():  # roundoff warnings far below the tolerances used
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        return sum(integrate.quad(f, a, b, epsabs=1e-15, epsrel=1e-13, limit=400)[0] for a, b in zip(pts, pts[1:]))


def integrate_expectation(name, k, p, mean, var):
    """E[(g^p)^(k)(Z)] = (-1)^k int g^p(z) pdf^(k)(z) dz = sd^-k int g^p(z) He_k(u) pdf(z) dz, u = (z - mean)/sd.

    Integration by parts puts every (distributional) derivative on the smooth density."""
    sd = math.sqrt(var)
    g, he = NP_FORWARD[name], hermite_e.HermiteE.basis(k)

    def integrand(z):
        u = (z - mean) / sd
        return float(g(z)) ** p * he(u) * math.exp(-0.5 * u * u) / (sd ** (k + 1) * math.sqrt(2 * math.pi))

    return _quad(integrand, mean - 14 * sd, mean + 14 * sd)


def test_numpy_references_match_module_forward():
    z = np.linspace(-4, 4, 41)
    for name in ACTIVATIONS:
        np.testing.assert_allclose(
            np.asarray(activation_fn(name)(jnp.asarray(z))), NP_FORWARD[name](z), rtol=1e-14, atol=1e-15
        )


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("k", range(6))
@pytest.mark.parametrize("p", range(1, 5))
def test_against_numerical_integration(name, k, p):
    mean = jnp.asarray([m for m, _ in POINTS])
    var = jnp.asarray([v for _, v in POINTS])
    got = np.asarray(gaussian_expectation(name, k, p, mean, var))
    want = np.array([integrate_expectation(name, k, p, m, v) for m, v in POINTS])
    tol = TOL.get(name, CLOSED_FORM_TOL)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("p", range(1, 6))
def test_relu_powers_below_the_kink_order(p):
    """k < p: E[(p)_k relu(Z)^(p-k)] via truncated normal moments, including large |mean/sd|."""
    points = [(0.2, 1.7), (1.3, 0.4), (-0.9, 0.6), (3.0, 0.1), (-2.0, 0.2), (0.0, 5.0)]
    mean, var = (jnp.asarray(c) for c in zip(*points))
    for k in range(p):
        got = np.asarray(gaussian_expectation("relu", k, p, mean, var))
        want = np.array([integrate_expectation("relu", k, p, m, v) for m, v in points])
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-13, err_msg=f"k={k}")


@pytest.mark.parametrize(
    "name,k,p,mean,var,value",
    [
        ("square", 0, 2, 0.0, 1.0, 3.0),  # E[Z^4]
        ("cube", 0, 2, 0.0, 1.0, 15.0),  # E[Z^6]
        ("square", 2, 2, 0.0, 1.0, 12.0),  # E[12 Z^2]
        ("cube", 6, 2, 0.0, 1.0, 720.0),  # d^6 z^6
        ("cube", 7, 2, 0.0, 1.0, 0.0),
        ("square", 0, 1, 2.0, 3.0, 7.0),  # mean^2 + var
        ("cube", 0, 1, 1.0, 2.0, 7.0),  # mean^3 + 3 mean var
        ("abs", 0, 2, 0.0, 1.0, 1.0),
        ("abs", 1, 4, 1.0, 1.0, 16.0),  # E[4 Z^3] = 4 (1 + 3)
        ("sgn", 0, 2, 0.3, 1.0, 1.0),
        ("sgn", 3, 4, 0.3, 1.0, 0.0),
    ],
)
def test_exact_values(name, k, p, mean, var, value):
    assert float(gaussian_expectation(name, k, p, mean, var)) == value


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("k,p", [(0, 1), (1, 1), (2, 1), (0, 2), (1, 3), (3, 2)])
def test_mean_and_variance_derivatives(name, k, p):
    """d/dmean E[g(Z)] = E[g'(Z)] and d/dvar E[g(Z)] = E[g''(Z)] / 2 (heat equation), distributional g too."""
    mean, var = jnp.asarray([0.3, -1.1, 0.0]), jnp.asarray([0.8, 0.25, 2.0])
    d_mean, d_var = jax.vmap(jax.grad(lambda m, v: gaussian_expectation(name, k, p, m, v), argnums=(0, 1)))(mean, var)
    tol = 2e-5 if name == "tanh" else 1e-9 if name == "gelu" else 1e-11
    np.testing.assert_allclose(d_mean, gaussian_expectation(name, k + 1, p, mean, var), rtol=tol, atol=tol)
    np.testing.assert_allclose(d_var, 0.5 * gaussian_expectation(name, k + 2, p, mean, var), rtol=tol, atol=tol)


def test_vanishing_variance_limits():
    mean = jnp.asarray([0.7, -0.4, 1.5])
    zero = jnp.zeros(3)
    for name in ("relu", "gelu", "sigmoid", "tanh", "abs", "square", "cube"):
        for p in (1, 2, 3):
            want = NP_FORWARD[name](np.asarray(mean)) ** p
            # the clamped variance 1e-10 biases smooth cases by ~g''/2 * 1e-10
            np.testing.assert_allclose(
                gaussian_expectation(name, 0, p, mean, zero), want, rtol=1e-7, atol=1e-9, err_msg=name
            )
    np.testing.assert_allclose(gaussian_expectation("heaviside", 0, 2, mean, zero), [1.0, 0.0, 1.0])
    np.testing.assert_allclose(
        gaussian_expectation("sgn", 0, 3, mean, -zero - 1.0), [1.0, -1.0, 1.0]
    )  # negative var clamps


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("mean,var", [([0.5, -0.5, 0.0], [0.0, 0.0, -1.0]), ([30.0, -30.0, 8.0], [1e-3, 1e-3, 1e-9])])
def test_finite_at_vanishing_variance_and_large_alpha(dtype, mean, var):
    mean, var = jnp.asarray(mean, dtype), jnp.asarray(var, dtype)
    for name in ACTIVATIONS:
        for k in (0, 2, 6):  # values, the p > 1 polynomial paths, and the overflow-prone high orders
            for p in (1, 2, 3):
                out = gaussian_expectation(name, k, p, mean, var)
                assert out.dtype == dtype and bool(jnp.all(jnp.isfinite(out))), (name, k, p)
        if dtype == jnp.float64:  # float32 warm-up of the gradient graph is slow; one dtype suffices
            for k in (0, 3):
                grads = jax.vmap(jax.grad(lambda m, v: gaussian_expectation(name, k, 2, m, v), argnums=(0, 1)))(
                    mean, var
                )
                assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads), (name, k)


def test_dtype_broadcast_jit_vmap():
    x32 = gaussian_expectation("tanh", 1, 2, jnp.zeros((2, 3), jnp.float32), jnp.ones(3, jnp.float32))
    assert x32.dtype == jnp.float32 and x32.shape == (2, 3)
    assert gaussian_expectation("relu", 0, 1, 0, 1).dtype == jnp.float64  # ints -> default float
    m = jnp.linspace(-1, 1, 5)
    for name in ("gelu", "relu"):  # a quadrature and a closed form
        f = jax.jit(jax.vmap(lambda mi: gaussian_expectation(name, 2, 1, mi, 1.0)))
        np.testing.assert_allclose(f(m), gaussian_expectation(name, 2, 1, m, 1.0), rtol=1e-13, atol=1e-15)
    g = jax.jit(jax.grad(lambda v: gaussian_expectation("sigmoid", 0, 1, 0.2, v)))
    assert bool(jnp.isfinite(g(0.5)))


@pytest.mark.parametrize("name", ["relu", "gelu", "sigmoid", "tanh", "abs", "square", "cube"])
def test_squared_slope_expectation(name, points=((0.2, 0.9), (-0.6, 2.5))):
    mean, var = (jnp.asarray(c) for c in zip(*points))
    got = np.asarray(squared_slope_expectation(name, mean, var))
    want = []
    for m, v in points:
        sd = math.sqrt(v)
        density = lambda z, m=m, sd=sd: math.exp(-0.5 * ((z - m) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))  # noqa: E731
        want.append(_quad(lambda z: float(NP_SLOPE[name](z)) ** 2 * density(z), m - 14 * sd, m + 14 * sd))
    np.testing.assert_allclose(got, want, rtol=TOL.get(name, CLOSED_FORM_TOL))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown activation"):
        gaussian_expectation("swish", 0, 1, 0.0, 1.0)
    with pytest.raises(ValueError):
        gaussian_expectation("relu", -1, 1, 0.0, 1.0)
    with pytest.raises(ValueError):
        gaussian_expectation("relu", 0, 0, 0.0, 1.0)
    for name in ("sgn", "heaviside", "swish"):
        with pytest.raises(ValueError):
            squared_slope_expectation(name, 0.0, 1.0)


def test_registered_activation_is_used_everywhere():
    """A user-registered nonlinearity (softplus: no closed form, so the quadrature rule) works in its
    Gaussian expectations, a network's forward pass, the estimator (exact at layer act0 for k_max 2)
    and the critical initialiser, and its name cannot be taken twice."""
    import cumjax as cj
    from cumjax import activations

    softplus = cj.Activation("softplus_test", jax.nn.softplus)
    try:
        cj.register_activation(softplus)
        cj.register_activation(softplus)  # the same object again: a no-op
        with pytest.raises(ValueError, match="already registered"):
            cj.register_activation(cj.Activation("softplus_test", jnp.tanh))
        assert "softplus_test" in cj.activation_names() and cj.get_activation("softplus_test") is softplus
        NP_FORWARD["softplus_test"] = lambda z: np.logaddexp(0.0, z)
        for k, p in ((0, 1), (1, 2), (3, 1)):
            got = float(gaussian_expectation("softplus_test", k, p, 0.4, 0.6))
            assert got == pytest.approx(integrate_expectation("softplus_test", k, p, 0.4, 0.6), rel=1e-9, abs=1e-12)
        spec = cj.MLPSpec(3, 4, 2, 2, softplus)  # the object itself, or its name
        assert spec.activations == ("softplus_test",)
        params = cj.init_params(jax.random.PRNGKey(0), spec, dtype=jnp.float64)
        x = jnp.ones((1, 3))
        (W0, _), _ = cj.layer_weights(params)
        np.testing.assert_allclose(cj.forward(params, spec, x, all_layers=True)["act0"], jax.nn.softplus(x @ W0))
        g = cj.Gaussian(jnp.zeros(3), jnp.eye(3))
        est = cj.propagate(params, spec, g, cj.PropagationConfig(k_max=2))
        var = np.diag(np.asarray(W0).T @ np.asarray(W0))
        want = [integrate_expectation("softplus_test", 0, 1, 0.0, v) for v in var]
        np.testing.assert_allclose(est.mean("act0"), want, rtol=1e-9)
        assert float(squared_slope_expectation("softplus_test", 0.0, 1.0)) > 0  # jax.grad of the forward
        with pytest.raises(ValueError, match="infeasible"):  # softplus(0) = log 2 would need a negative bias variance
            cj.MLPSpec(3, 4, 2, 3, "softplus_test", init=cj.Init(kind="critical", q_star=1.0))
    finally:
        activations._REGISTRY.pop("softplus_test", None)
        NP_FORWARD.pop("softplus_test", None)
    with pytest.raises(ValueError, match="unknown activation"):
        cj.MLPSpec(3, 4, 2, 2, "softplus_test")
    with pytest.raises(TypeError):
        cj.register_activation("softplus")
