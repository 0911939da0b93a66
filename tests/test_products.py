"""Sums of products of slot-indexed arrays: the stacked evaluation equals the term-by-term sum."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from cumjax import products


def _direct(terms, m, n):
    total = np.zeros((n,) * m)
    for c, pieces in terms:
        prod = np.full((n,) * m, float(c))
        for a, lab in pieces:
            target = tuple(sorted(lab))
            a = np.transpose(np.asarray(a), [lab.index(s) for s in target])
            prod = prod * np.reshape(a, [n if j in target else 1 for j in range(m)])
        total += prod
    return total


@pytest.mark.parametrize("m", [2, 3, 4])
def test_random_sums_of_products(m):
    rng = np.random.default_rng(m)
    n = 5
    supports = [s for r in range(1, m + 1) for s in itertools.combinations(range(m), r)]
    terms = []
    for _ in range(40):
        pieces = []
        for _ in range(rng.integers(1, 4)):
            s = list(supports[rng.integers(len(supports))])
            rng.shuffle(s)  # any axis order
            pieces.append((jnp.asarray(rng.normal(size=(n,) * len(s))), tuple(s)))
        terms.append((float(rng.normal()), pieces))
    terms.append((2.5, []))  # a constant
    got = products.evaluate(terms, m, n, jnp.float64)
    np.testing.assert_allclose(np.asarray(got), _direct(terms, m, n), rtol=1e-12, atol=1e-12)
    groups = products.plan(terms, n)
    assert sum(g.count for g in groups) == len(terms) and all(len(g.signature) <= 2 for g in groups)


def test_paths_become_one_batched_contraction():
    rng = np.random.default_rng(0)
    n = 4
    terms = [
        (
            1.0,
            [
                (jnp.asarray(rng.normal(size=(n, n))), (0, 1)),
                (jnp.asarray(rng.normal(size=(n, n))), (1, 2)),
                (jnp.asarray(rng.normal(size=n)), (2,)),
            ],
        )
        for _ in range(7)
    ]
    (group,) = products.plan(terms, n)
    assert group.signature == ((0, 1), (1, 2)) and group.count == 7 and group.flops == 2 * 7 * n**3


@pytest.mark.parametrize("count", [12, 40])
@pytest.mark.parametrize("sig", [((0, 1), (0, 2)), ((0, 1), (1, 2)), ((0, 2), (1, 2))])
def test_groups_summed_or_contracted_by_output_order(sig, count):
    """A stacked contraction whose output is already in slot order is used from 8 terms; one
    that would need a transpose only from 32 (broadcast products below): both equal the sum."""
    in_order = sig == ((0, 1), (0, 2))
    assert products._min_stack(sig) == (products._MIN_STACK if in_order else products._MIN_STACK_TRANSPOSED)
    rng = np.random.default_rng(count)
    n = 4
    terms = [(float(rng.normal()), [(jnp.asarray(rng.normal(size=(n, n))), s) for s in sig]) for _ in range(count)]
    got = products.evaluate(terms, 3, n, jnp.float64)
    np.testing.assert_allclose(np.asarray(got), _direct(terms, 3, n), rtol=1e-12, atol=1e-12)
