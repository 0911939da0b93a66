"""The nonlinear step: cumulants of ``phi(Z)`` from the tracked cumulants of Z, slice by slice.

A *slice* ``alpha`` of a symmetric tensor holds its entries where ``m = len(alpha)`` distinct
neurons appear ``alpha_j`` times (:mod:`cumjax.diagrams`). The step computes the slices of the
joint cumulants of powers of phi as diagram sums (products of input-cumulant slices and Gaussian
expectations of phi's derivatives), converts them to cumulant slices, and projects them back onto
the tracked radial pieces through traces.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

from . import activations as _act
from . import diagrams as dg
from . import products
from ._fusion import materialize
from .config import PropagationConfig
from .radial import RadialTensor

Array = jax.Array
Tower = dict  # degree -> RadialTensor | FactoredTensor


def zero_coincident(x: Array) -> Array:
    """Zero the entries of an ``(n,)*m`` slice where two slot indices coincide (a scatter onto
    those ``O(n^(m-1))`` entries, not a pass over all ``n^m``)."""
    m = x.ndim
    if m < 2:
        return x
    i = jnp.arange(x.shape[0])
    for a, b in itertools.combinations(range(m), 2):
        x = x.at[tuple(i if t in (a, b) else slice(None) for t in range(m))].set(0.0)
    return x


def sorted_piece(get, v: dg.Vec):
    """``get(pattern)`` for the sorted nonzero entries of the slot vector ``v``, as a
    :mod:`cumjax.products` piece: the array in sorted order and the slot of each of its axes (so
    no transpose is made here)."""
    slots = [j for j in range(len(v)) if v[j]]
    order = sorted(slots, key=lambda j: -v[j])
    return get(tuple(v[j] for j in order)), tuple(order)


def sorted_view(get, pattern: dg.Vec) -> Array:
    """``get(sorted pattern)`` with its axes permuted into the order of ``pattern``."""
    order = sorted(range(len(pattern)), key=lambda j: -pattern[j])
    perm = [order.index(j) for j in range(len(pattern))]
    x = get(tuple(pattern[j] for j in order))
    return x if perm == sorted(perm) else materialize(jnp.transpose(x, perm))


class NonlinearStep:
    """Cumulants of ``phi(Z)`` from the tower of Z, computed slice by slice on demand.

    Every slice is built once (memoised at trace time); which slices exist is decided by what the
    tracked outputs need.
    """

    def __init__(self, tower: Tower, activation: str, config: PropagationConfig):
        self.tower, self.act, self.cfg = tower, activation, config
        mean = tower[1].core
        k2 = tower[2]
        self.var = jnp.diagonal(k2.core) if k2.r == 0 else k2.core * k2._metric_diag()
        self.mean, self.n = mean, mean.shape[0]
        self.degrees = frozenset(tower)
        self._memo: dict = {}

    def _cached(self, key, fn):
        # every cached array (Gaussian expectations included) is computed once into a buffer, not
        # re-evaluated inside each n^m loop that reads it
        if key not in self._memo:
            self._memo[key] = materialize(fn(), min_ndim=1)
        return self._memo[key]

    def wick(self, order: int, power: int) -> Array:
        return self._cached(
            ("w", order, power), lambda: _act.gaussian_expectation(self.act, order, power, self.mean, self.var)
        )

    def block(self, pattern: dg.Vec) -> Array:
        return self._cached(("b", pattern), lambda: self.tower[sum(pattern)].slice(pattern))

    def block_piece(self, pattern: dg.Vec, slots: tuple[int, ...]):
        """Block ``pattern`` on ``slots`` as a :mod:`cumjax.products` piece ``(array, labels)``."""
        return self.block(tuple(pattern)), slots

    def power_cumulant(self, alpha: dg.Vec) -> Array:
        """Slice ``alpha`` (sorted) of the joint cumulants of powers of phi(Z): the diagram sum,
        each diagram a product of input blocks and one Gaussian expectation per slot, summed as
        stacked contractions (:mod:`cumjax.products`)."""

        def build():
            m = len(alpha)
            terms = []
            for t in dg.diagrams(alpha, self.cfg.k_max, self.cfg.kind, self.degrees, self.cfg.factored):
                pieces = []
                for v in t.blocks:
                    slots = tuple(j for j in range(m) if v[j])
                    pieces.append(self.block_piece(tuple(v[j] for j in slots), slots))
                pieces += [(self.wick(o, p), (j,)) for j, (o, p) in enumerate(zip(t.orders, alpha))]
                terms.append((t.coef, pieces))
            return products.evaluate(terms, m, self.n, self.mean.dtype)

        return self._cached(("p", alpha), build)

    def cumulant(self, alpha: dg.Vec) -> Array:
        """Slice ``alpha`` (sorted) of the cumulants of phi(Z), zero on coincident indices."""

        def build():
            m = len(alpha)
            terms = []
            for coef, pieces in dg.cumulant_from_power_cumulants(alpha):
                terms.append((coef, [sorted_piece(self.power_cumulant, v) for v in pieces]))
            return zero_coincident(products.evaluate(terms, m, self.n, self.mean.dtype))

        return self._cached(("k", alpha), build)

    def traced(self, d: int, j: int, beta: dg.Vec) -> Array:
        """Slice ``beta`` (sorted) of ``tr^j K_d``: a trace joins two legs of one slot (slices
        vanish where slots coincide), either inside an existing slot or on a new summed slot."""
        if j == 0:
            return self.cumulant(beta)

        def build():
            m = len(beta)
            prev = lambda a: self.traced(d, j - 1, a)  # noqa: E731
            total = 0.0
            for i in range(m):
                total = total + sorted_view(prev, beta[:i] + (beta[i] + 2,) + beta[i + 1 :])
            return total + jnp.sum(sorted_view(prev, beta + (2,)), axis=-1)

        return self._cached(("t", d, j, beta), build)

    def dense(self, get, d: int) -> Array:
        """Assemble a dense symmetric ``(n,)*d`` tensor from its sorted slices ``get(alpha)``:
        every set partition of the d legs picks the slice of its block sizes, placed on the
        corresponding generalized diagonal."""
        if d == 0:
            return get(())
        n, ar = self.n, jnp.arange(self.n)
        flat_idx, vals = [], []
        for part in dg.set_partitions(d)[1:]:  # the first is all singletons: the top slice itself
            blocks = sorted(part, key=len, reverse=True)
            m = len(blocks)
            slot_of_leg = {p: j for j, b in enumerate(blocks) for p in b}
            flat = sum(
                jnp.reshape(ar, [n if t == slot_of_leg[p] else 1 for t in range(m)]) * n ** (d - 1 - p)
                for p in range(d)
            )
            flat_idx.append(jnp.broadcast_to(flat, (n,) * m).ravel())
            vals.append(get(tuple(len(b) for b in blocks)).ravel())
        top = get((1,) * d).ravel()
        if flat_idx:  # one scatter for all generalized diagonals (they never overlap)
            top = top.at[jnp.concatenate(flat_idx)].add(jnp.concatenate(vals), unique_indices=True)
        return top.reshape((n,) * d)

    def output(self) -> Tower:
        return {d: self.output_degree(d, r) for d, r in dg.tracked_degrees(self.cfg.k_max, self.cfg.kind).items()}

    def output_degree(self, d: int, r: int):
        """The tracked degree-d cumulant of phi(Z) with radial index r."""
        if r == 0:
            return RadialTensor(self.dense(self.cumulant, d))
        core = 0.0
        coefs = dg.radial_core_coefs(self.n, d, r)
        for j, c in zip(range(r, d // 2 + 1), coefs):
            tr = self.dense(lambda a, j=j: self.traced(d, j, a), d - 2 * j)
            core = core + c * RadialTensor(tr, j - r, None, self.n).dense()
        return RadialTensor(core, r, None, self.n)
