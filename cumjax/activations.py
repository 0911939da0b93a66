"""Elementwise nonlinearities: a registry of :class:`Activation` objects.

An activation is everything cumulant propagation needs to know about a nonlinearity phi: its
forward function and its Gaussian expectations

    E[(d/dz)^k phi(z)^p],  Z ~ N(mean, var)   (derivatives in the distributional sense),

the only way phi enters the estimator. Each built-in activation carries closed forms where they
exist (relu, heaviside, sgn, abs, square, cube); the others (gelu, sigmoid, tanh, and any
registered without a closed form) use a 100-node Gauss-Hermite rule through Stein's identity, so
phi itself is never differentiated. Add one with :func:`register_activation`; networks refer to
activations by name.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import cache

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr
from jax.scipy.stats import norm
from numpy.polynomial import hermite_e
from numpy.polynomial import polynomial as P

Array = jax.Array

_MIN_VAR = 1e-10  # the propagated diagonal can dip to <= 0; clamping keeps sd > 0
QUADRATURE_NODES = 100
# pdf(40) underflows to 0 even in float64, so clipping a polynomial's argument there changes no
# value but keeps poly(alpha) * pdf(alpha) from becoming inf * 0 = NaN when var -> 0.
_PDF_CUTOFF = 40.0

#: Accuracy of the Gauss-Hermite rule, measured against adaptive quadrature (relative to
#: max(1, |value|), k <= 5, p <= 4; tests/test_activations.py).
QUADRATURE_ACCURACY = (
    "100-node Gauss-Hermite rule: error <= 1e-8 for var <= 1; at var 2.5 gelu 5e-10, sigmoid 2e-13, "
    "tanh 6e-6; at var 9 gelu 4e-6, sigmoid 7e-8, tanh 2e-3 (tanh's poles at +-i pi/2 slow it)"
)


@dataclasses.dataclass(frozen=True, eq=False)
class Activation:
    """An elementwise nonlinearity and its Gaussian expectations.

    name: the key networks use (``MLPSpec.activations``).
    forward: ``phi``, elementwise on jax arrays.
    expectation: ``(k, p, mean, var, sd) -> E[(d/dz)^k phi(Z)^p]`` for ``Z ~ N(mean, var)``
        (arrays of one shape, ``var >= 1e-10``, ``sd = sqrt(var)``; ``k >= 0``, ``p >= 1`` static
        ints), or None for the Gauss-Hermite rule (:data:`QUADRATURE_ACCURACY`).
    slope_expectation: ``(mean, var, sd) -> E[phi'(Z)^2]`` (the critical initialiser's chi), or None
        for the rule applied to ``jax.grad(forward)``; ``has_slope=False`` for step functions
        (their derivative is a delta).
    accuracy: how ``expectation`` is computed and how accurate it is.
    """

    name: str
    forward: Callable[[Array], Array]
    expectation: Callable | None = None
    slope_expectation: Callable | None = None
    has_slope: bool = True
    accuracy: str = QUADRATURE_ACCURACY

    def __call__(self, x: Array) -> Array:
        return self.forward(x)

    def gaussian_expectation(self, k: int, p: int, mean, var) -> Array:
        """``E[(d/dz)^k phi(Z)^p]``, ``Z ~ N(mean, var)``; mean and var broadcast together, their
        float dtype (the default float for ints). Variances below 1e-10 are clamped."""
        if not (isinstance(k, (int, np.integer)) and isinstance(p, (int, np.integer))) or k < 0 or p < 1:
            raise ValueError(f"need derivative order k >= 0 and power p >= 1 (ints), got k={k!r}, p={p!r}")
        mean, var, sd = _prepare(mean, var)
        if self.expectation is None:
            return _quadrature(self.forward, int(k), int(p), mean, sd)
        return self.expectation(int(k), int(p), mean, var, sd)

    def squared_slope_expectation(self, mean, var) -> Array:
        """``E[phi'(Z)^2]``, ``Z ~ N(mean, var)``."""
        if not self.has_slope:
            raise ValueError(f"{self.name} has no square-integrable derivative (it is a delta): no edge-of-chaos init")
        mean, var, sd = _prepare(mean, var)
        if self.slope_expectation is not None:
            return self.slope_expectation(mean, var, sd)
        _, w = _hermgauss()
        z = _nodes(mean, sd)
        slope = jax.vmap(jax.grad(self.forward))(z.reshape(-1)).reshape(z.shape)
        return jnp.sum(jnp.asarray(w, mean.dtype) * slope**2, axis=-1)


_REGISTRY: dict[str, Activation] = {}


def register_activation(activation: Activation, replace: bool = False) -> Activation:
    """Make ``activation`` available by its name to networks and estimators. Registering another
    object under a taken name raises unless ``replace``; re-registering the same object is a no-op."""
    if not isinstance(activation, Activation):
        raise TypeError(f"register_activation takes an Activation, got {type(activation).__name__}")
    if not isinstance(activation.name, str) or not activation.name:
        raise ValueError(f"an activation needs a non-empty string name, got {activation.name!r}")
    old = _REGISTRY.get(activation.name)
    if old is not None and old is not activation and not replace:
        raise ValueError(f"an activation named {activation.name!r} is already registered (pass replace=True)")
    _REGISTRY[activation.name] = activation
    return activation


def get_activation(name: str | Activation) -> Activation:
    """The registered :class:`Activation` of that name (an Activation is returned as is)."""
    if isinstance(name, Activation):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown activation {name!r}; expected one of {', '.join(_REGISTRY)} "
            f"(or register one with cumjax.register_activation)"
        ) from None


def check_activation(name) -> str:
    """The name of a registered activation (``name`` may be the Activation itself); else ValueError."""
    return get_activation(name).name


def activation_names() -> tuple[str, ...]:
    """Names of every registered activation."""
    return tuple(_REGISTRY)


def activation_fn(name: str) -> Callable[[Array], Array]:
    """The elementwise function phi of a registered activation."""
    return get_activation(name).forward


def gaussian_expectation(name: str, k: int, p: int, mean, var) -> Array:
    """``E[(d/dz)^k phi(Z)^p]`` for the activation ``name``, ``Z ~ N(mean, var)``: see
    :meth:`Activation.gaussian_expectation`. jit/vmap/grad-safe in mean and var."""
    return get_activation(name).gaussian_expectation(k, p, mean, var)


def squared_slope_expectation(name: str, mean, var) -> Array:
    """``E[phi'(Z)^2]`` for the activation ``name``, ``Z ~ N(mean, var)``."""
    return get_activation(name).squared_slope_expectation(mean, var)


# ----------------------------------------------------------------------------- shared pieces


def _prepare(mean, var):
    """Broadcast to one floating dtype (theirs; the default float for ints), clamp var; -> (mean, var, sd)."""
    dtype = jnp.result_type(mean, var)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    mean, var = jnp.broadcast_arrays(jnp.asarray(mean, dtype), jnp.asarray(var, dtype))
    var = jnp.maximum(var, _MIN_VAR)
    return mean, var, jnp.sqrt(var)


def _polyval(coefs, x):
    """Horner evaluation of numpy coefficients (lowest degree first) at a jnp array."""
    out = jnp.zeros_like(x)
    for c in coefs[::-1]:
        out = out * x + float(c)  # python floats are weakly typed: float32 stays float32
    return out


@cache
def _hermite_e_coefs(k: int) -> np.ndarray:
    """Monomial coefficients of the probabilists' Hermite polynomial He_k."""
    return hermite_e.herme2poly(np.eye(k + 1)[k])


def _poly_times_pdf(coefs, a):
    a = jnp.clip(a, -_PDF_CUTOFF, _PDF_CUTOFF)
    return _polyval(coefs, a) * norm.pdf(a)


@cache
def _hermgauss() -> tuple[np.ndarray, np.ndarray]:
    """Nodes x = sqrt(2) t and weights w / sqrt(pi) of the 100-node rule, for E[f(X)], X ~ N(0, 1)."""
    t, w = np.polynomial.hermite.hermgauss(QUADRATURE_NODES)
    return math.sqrt(2) * t, w / math.sqrt(math.pi)


def _nodes(mean, sd):
    """Quadrature points mean + sd x, shape (..., 100)."""
    x, _ = _hermgauss()
    return mean[..., None] + sd[..., None] * jnp.asarray(x, mean.dtype)


def _quadrature(forward, k: int, p: int, mean, sd):
    """Stein's identity E[g^(k)(Z)] = sd^-k E[He_k(X) g(mean + sd X)]: f is never differentiated."""
    x, w = _hermgauss()
    weights = jnp.asarray(w * hermite_e.hermeval(x, np.eye(k + 1)[k]), mean.dtype)  # float64 at trace time
    return jnp.sum(weights * forward(_nodes(mean, sd)) ** p, axis=-1) / sd**k


# ----------------------------------------------------------------------------- closed forms


def _relu1(k: int, mean, sd):
    """E[(d/dz)^k relu(Z)]: k=0 the mean of relu, k=1 Phi, k>=2 a derivative of the density at 0."""
    a = mean / sd
    if k == 0:
        return sd * norm.pdf(a) + mean * ndtr(a)
    if k == 1:
        return ndtr(a)
    return (-1) ** k * sd ** (1 - k) * _poly_times_pdf(_hermite_e_coefs(k - 2), a)


@cache
def _truncated_moment_polys(q: int) -> tuple[np.ndarray, np.ndarray]:
    """Polynomials (P1, P2) in a with E[(a + X)^q 1{X > -a}] = P1(a) pdf(a) + P2(a) Phi(a), X ~ N(0, 1).

    M_j = E[X^j 1{X > c}] obeys M_j = c^(j-1) pdf(c) + (j-1) M_(j-2) (integrate x pdf = -pdf' by
    parts), M_0 = Phi(a), M_1 = pdf(a) at c = -a; then expand (a + X)^q binomially."""
    moments = [(np.zeros(1), np.ones(1)), (np.ones(1), np.zeros(1))]  # (pdf part, Phi part)
    for j in range(2, q + 1):
        pdf_part = P.polyadd(P.polypow([0.0, -1.0], j - 1), (j - 1) * moments[j - 2][0])
        moments.append((pdf_part, (j - 1) * moments[j - 2][1]))
    p1, p2 = np.zeros(1), np.zeros(1)
    for i in range(q + 1):
        shift = math.comb(q, i) * P.polypow([0.0, 1.0], q - i)
        p1 = P.polyadd(p1, P.polymul(shift, moments[i][0]))
        p2 = P.polyadd(p2, P.polymul(shift, moments[i][1]))
    return p1, p2


def _relu(k: int, p: int, mean, sd):
    """E[(d/dz)^k relu(Z)^p]."""
    if k >= p:  # the (p-1)-th derivative of relu^p is p! relu
        return math.factorial(p) * _relu1(k - p + 1, mean, sd)
    q = p - k  # the k-th derivative is (p)_k relu^q
    a = mean / sd
    p1, p2 = _truncated_moment_polys(q)
    return math.perm(p, k) * sd**q * (_poly_times_pdf(p1, a) + _polyval(p2, a) * ndtr(a))


def _gaussian_raw_moment(i: int, mean, var):
    """E[Z^i] = sum_j C(i, 2j) (2j-1)!! var^j mean^(i-2j): no division by sd, exact as var -> 0."""
    terms = (
        math.comb(i, 2 * j) * math.prod(range(2 * j - 1, 0, -2)) * var**j * mean ** (i - 2 * j)
        for j in range(i // 2 + 1)
    )
    return sum(terms, jnp.zeros_like(mean))


def _monomial(n: int, k: int, mean, var):
    """E[(d/dz)^k Z^n]."""
    if k > n:
        return jnp.zeros_like(mean)
    return math.perm(n, k) * _gaussian_raw_moment(n - k, mean, var)


def _sgn(k, p, mean, var, sd):
    if p % 2 == 0:  # sgn^p = 1 almost surely
        return jnp.full_like(mean, 1.0 if k == 0 else 0.0)
    return 2 * ndtr(mean / sd) - 1 if k == 0 else 2 * _relu1(k + 1, mean, sd)  # sgn = 2H - 1


def _abs(k, p, mean, var, sd):
    if p % 2 == 0:  # |z|^p = z^p
        return _monomial(p, k, mean, var)
    # |z|^p = relu(z)^p + relu(-z)^p; -Z ~ N(-mean, var) and each derivative flips sign.
    return _relu(k, p, mean, sd) + (-1) ** k * _relu(k, p, -mean, sd)


def _power(c: int) -> Activation:
    """``z^c``: exact Gaussian moments; phi'^2 = c^2 z^(2c-2)."""
    return Activation(
        {2: "square", 3: "cube"}[c],
        lambda x: x**c if c == 2 else x * x * x,
        expectation=lambda k, p, mean, var, sd: _monomial(c * p, k, mean, var),
        slope_expectation=lambda mean, var, sd: c * c * _gaussian_raw_moment(2 * c - 2, mean, var),
        accuracy="exact (Gaussian moments)",
    )


_CLOSED = "closed form (normal pdf and cdf)"
for _act in (
    Activation(
        "relu",
        jax.nn.relu,
        lambda k, p, mean, var, sd: _relu(k, p, mean, sd),
        lambda mean, var, sd: ndtr(mean / sd),
        accuracy=_CLOSED,
    ),
    Activation("gelu", lambda x: jax.nn.gelu(x, approximate=False)),  # the exact erf form
    Activation("sigmoid", jax.nn.sigmoid),
    Activation("tanh", jnp.tanh),
    Activation("abs", jnp.abs, _abs, lambda mean, var, sd: jnp.ones_like(mean), accuracy=_CLOSED),
    Activation("sgn", jnp.sign, _sgn, has_slope=False, accuracy=_CLOSED),
    _power(2),
    _power(3),
    # H(0) = 0, as in the reference; H^p = H = relu', so its expectations are relu's one order up.
    Activation(
        "heaviside",
        lambda x: (x > 0).astype(x.dtype),
        lambda k, p, mean, var, sd: _relu1(k + 1, mean, sd),
        has_slope=False,
        accuracy=_CLOSED,
    ),
):
    register_activation(_act)

#: The built-in activations.
ACTIVATIONS = activation_names()
