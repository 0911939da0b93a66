"""Combinatorics of the propagation: term counts, the power-cumulant conversion, radial tensors."""

import itertools
import math

import numpy as np
import pytest

from cumjax import diagrams as dg


def output_slices(k, kind):
    """Every slice pattern the reference computes in a nonlinear step: sum_j ceil(a_j / 2) <= k."""
    dmax = dg.top_degree(k, kind)
    return [a for d in range(1, dmax + 1) for a in dg.int_partitions(d) if sum((x + 1) // 2 for x in a) <= k]


@pytest.mark.parametrize(
    "k,kind,terms,factored_terms",
    # (output slice, diagram) pairs per hidden nonlinear step, as enumerated by the reference.
    [
        (1, "simple", 2, 2),
        (1, "augment", 2, 2),
        (2, "simple", 3, 3),
        (2, "augment", 27, 27),
        (3, "simple", 40, 40),
        (3, "augment", 142, 135),
        (4, "simple", 171, 171),
        (4, "augment", 2950, 2863),
    ],
)
def test_term_counts(k, kind, terms, factored_terms):
    degrees = frozenset(range(1, dg.top_degree(k, kind) + 1))
    count = lambda fac: sum(len(dg.diagrams(a, k, kind, degrees, fac)) for a in output_slices(k, kind))
    assert count(False) == terms
    assert count(True) == factored_terms


def test_tracked_degrees():
    assert dg.tracked_degrees(1, "simple") == {1: 0, 2: 1}
    assert dg.tracked_degrees(2, "augment") == {1: 0, 2: 0, 3: 1, 4: 2}
    assert dg.tracked_degrees(3, "simple") == {1: 0, 2: 0, 3: 0, 4: 2}
    assert dg.tracked_degrees(4, "augment") == {1: 0, 2: 0, 3: 0, 4: 0, 5: 1, 6: 3}


def _joint_cumulant(samples, weights):
    """Exact joint cumulant of the columns of a finite distribution (Moebius over set partitions)."""
    q = samples.shape[1]
    total = 0.0
    for part in dg.set_partitions(q):
        mom = math.prod(float(np.sum(weights * np.prod(samples[:, list(b)], axis=1))) for b in part)
        total += (-1) ** (len(part) - 1) * math.factorial(len(part) - 1) * mom
    return total


@pytest.mark.parametrize("alpha", [(2,), (3,), (4,), (2, 1), (3, 1), (2, 2), (2, 1, 1), (1, 1, 1), (3, 2), (2, 2, 1)])
def test_cumulants_from_power_cumulants_exact(alpha):
    rng = np.random.default_rng(len(alpha) * 10 + sum(alpha))
    m = len(alpha)
    support = rng.normal(size=(7, m))
    weights = rng.random(7)
    weights /= weights.sum()
    copies = [j for j, a in enumerate(alpha) for _ in range(a)]
    want = _joint_cumulant(support[:, copies], weights)

    def power_cumulant(piece):
        slots = [j for j in range(m) if piece[j]]
        return _joint_cumulant(np.stack([support[:, j] ** piece[j] for j in slots], axis=1), weights)

    got = sum(c * math.prod(power_cumulant(p) for p in pieces) for c, pieces in dg.cumulant_from_power_cumulants(alpha))
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)


# --- dense references for symmetric tensors (independent of cumjax.propagate)


def _sym(t):
    d = t.ndim
    return sum(np.transpose(t, p) for p in itertools.permutations(range(d))) / math.factorial(d)


def _radial(core, metric, r):
    t = core
    for _ in range(r):
        t = np.multiply.outer(t, metric)
    return _sym(t)


def _trace(t, j=1):
    for _ in range(j):
        t = np.trace(t, axis1=0, axis2=1)
    return t


@pytest.mark.parametrize(
    "pattern,r",
    [
        ((2,), 1),
        ((1, 1), 1),
        ((2, 1), 1),
        ((3,), 1),
        ((2, 2), 2),
        ((2, 1, 1), 1),
        ((4,), 2),
        ((3, 1), 1),
        ((2, 2, 1), 2),
    ],
)
@pytest.mark.parametrize("full_metric", [True, False])
def test_radial_slice_terms_match_dense(pattern, r, full_metric):
    rng = np.random.default_rng(0)
    n, d = 5, sum(pattern)
    s = d - 2 * r
    core = _sym(rng.normal(size=(n,) * s)) if s else np.array(rng.normal())
    a = rng.normal(size=(n, n))
    metric = a @ a.T if full_metric else np.diag(rng.random(n))
    dense = _radial(core, metric, r)
    idx = (0, 2, 4)[: len(pattern)]
    want = dense[tuple(i for i, x in zip(idx, pattern) for _ in range(x))]
    got = 0.0
    for coef, avec, edges in dg.radial_slice_terms(pattern, r, full_metric):
        term = coef * core[tuple(i for i, x in zip(idx, avec) for _ in range(x))]
        for j, l in edges:
            term *= metric[idx[j], idx[l]]
        got += term
    assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("n,d,r", [(3, 2, 1), (4, 3, 1), (3, 4, 1), (3, 4, 2), (3, 5, 1), (2, 6, 3), (2, 6, 1)])
def test_radial_core_projects_onto_high_radial_components(n, d, r):
    """``R^r core`` keeps exactly the radial components >= r: ``L^r`` cannot tell it from T,
    and applying the projection to ``R^r core`` gives ``core`` back."""
    rng = np.random.default_rng(d * 10 + r)
    eye = np.eye(n)

    def core_of(t):
        return sum(
            c * _radial(_trace(t, j), eye, j - r) for j, c in zip(range(r, d // 2 + 1), dg.radial_core_coefs(n, d, r))
        )

    t = _sym(rng.normal(size=(n,) * d))
    core = core_of(t)
    lifted = _radial(core, eye, r)
    np.testing.assert_allclose(_trace(t - lifted, r), 0.0, atol=1e-10)
    np.testing.assert_allclose(core_of(lifted), core, atol=1e-10)
