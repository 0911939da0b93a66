"""Gaussian expectations E[d^k phi(Z)^p] against independent numerical integration."""
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.polynomial import hermite_e
from scipy import integrate

from cumjax.activations import ACTIVATIONS, activation_fn, gaussian_expectation, squared_slope_expectation

POINTS = [(0.0, 1.0), (0.4, 0.3), (-0.7, 2.5)]
QUADRATURE = ("gelu", "sigmoid", "tanh")


def _integrate(name, k, p, mean, var):
    """(-1)^k * integral of phi(z)^p * d^k/dz^k pdf(z) dz: integration by parts moves every
    (distributional) derivative onto the smooth density. d^k pdf = (-1)^k He_k(u) pdf / sd^k."""
    sd = math.sqrt(var)
    f = lambda z: float(activation_fn(name)(jnp.float64(z))) ** p  # noqa: E731
    he = hermite_e.HermiteE.basis(k)

    def integrand(z):
        u = (z - mean) / sd
        return f(z) * he(u) * math.exp(-0.5 * u * u) / (sd ** (k + 1) * math.sqrt(2 * math.pi))

    # split at the kink/jump at 0 so quad sees smooth pieces
    lo, hi = mean - 12 * sd, mean + 12 * sd
    pts = sorted({lo, min(max(0.0, lo), hi), hi})
    with warnings.catch_warnings():  # quad warns about roundoff far below the tolerances used
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        return sum(integrate.quad(integrand, a, b, epsabs=1e-14, epsrel=1e-12, limit=200)[0] for a, b in zip(pts, pts[1:]))


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("k", range(6))
@pytest.mark.parametrize("p", range(1, 5))
def test_against_numerical_integration(name, k, p):
    mean = jnp.asarray([m for m, _ in POINTS])
    var = jnp.asarray([v for _, v in POINTS])
    got = np.asarray(gaussian_expectation(name, k, p, mean, var))
    want = np.array([_integrate(name, k, p, m, v) for m, v in POINTS])
    scale = max(1.0, float(np.abs(want).max()))
    # closed forms are exact; the 100-node rule converges slowest for tanh (poles near the axis)
    tol = {"tanh": 1e-5, "gelu": 1e-8, "sigmoid": 1e-8}.get(name, 1e-9)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("p,k,value", [(2, 0, 3.0), (3, 0, 15.0), (2, 2, 12.0), (3, 6, 6 * 5 * 4 * 3 * 2 * 1 * 15.0 / 15.0)])
def test_polynomials_give_exact_moments(p, k, value):
    # square^p = z^(2p): E[z^4] = 3, E[z^6] = 15, E[(z^4)''] = 12 E[z^2] = 12
    if (p, k) == (3, 6):  # d^6 z^6 = 720
        value = 720.0
    assert float(gaussian_expectation("square", k, p, 0.0, 1.0)) == value


@pytest.mark.parametrize("name", ["relu", "gelu", "sigmoid", "tanh", "square", "cube", "abs", "sgn", "heaviside"])
@pytest.mark.parametrize("k,p", [(0, 1), (1, 1), (0, 2), (2, 1), (1, 3)])
def test_mean_and_variance_derivatives(name, k, p):
    """d/dmu E[g(Z)] = E[g'(Z)] and d/dvar E[g(Z)] = E[g''(Z)] / 2 (heat equation)."""
    mean, var = 0.3, 0.8
    d_mean = jax.grad(lambda m: gaussian_expectation(name, k, p, m, var))(mean)
    d_var = jax.grad(lambda v: gaussian_expectation(name, k, p, mean, v))(var)
    tol = 2e-6 if name == "tanh" else 1e-8
    assert float(d_mean) == pytest.approx(float(gaussian_expectation(name, k + 1, p, mean, var)), rel=tol, abs=tol)
    assert float(d_var) == pytest.approx(0.5 * float(gaussian_expectation(name, k + 2, p, mean, var)), rel=tol, abs=tol)


def test_relu_high_powers_closed_form():
    for p in range(1, 6):
        for k in range(p):
            got = float(gaussian_expectation("relu", k, p, 0.2, 1.7))
            assert got == pytest.approx(_integrate("relu", k, p, 0.2, 1.7), rel=1e-9)


def test_vanishing_variance_is_safe_and_dtypes_follow_inputs():
    for name in ACTIVATIONS:
        for k in range(4):
            out = gaussian_expectation(name, k, 2, jnp.asarray([0.5, -0.5, 0.0]), jnp.zeros(3))
            assert bool(jnp.all(jnp.isfinite(out))), name
    x32 = gaussian_expectation("tanh", 1, 2, jnp.zeros(3, jnp.float32), jnp.ones(3, jnp.float32))
    assert x32.dtype == jnp.float32
    f = jax.jit(jax.vmap(lambda m: gaussian_expectation("gelu", 2, 1, m, 1.0)))
    assert f(jnp.linspace(-1, 1, 5)).shape == (5,)


def test_squared_slope_expectation():
    for name in ("relu", "gelu", "sigmoid", "tanh", "abs", "square", "cube"):
        g = jax.grad(activation_fn(name))

        def integrand(z):
            return float(g(jnp.float64(z))) ** 2 * math.exp(-0.5 * (z - 0.2) ** 2 / 0.9) / math.sqrt(2 * math.pi * 0.9)

        want = sum(integrate.quad(integrand, a, b, epsabs=1e-13)[0] for a, b in ((-12, 0), (0, 12)))
        assert float(squared_slope_expectation(name, 0.2, 0.9)) == pytest.approx(want, rel=2e-6), name
    with pytest.raises(ValueError):
        squared_slope_expectation("sgn", 0.0, 1.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown activation"):
        gaussian_expectation("swish", 0, 1, 0.0, 1.0)
    with pytest.raises(ValueError):
        gaussian_expectation("relu", -1, 1, 0.0, 1.0)
    with pytest.raises(ValueError):
        gaussian_expectation("relu", 0, 0, 0.0, 1.0)
