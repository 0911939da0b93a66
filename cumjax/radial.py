"""Symmetric tensors in radial (harmonic) form, ``Sym(core (x) M^{(x)r})``, and their slices."""

from __future__ import annotations

import itertools
import string
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from . import diagrams as dg
from .lowrank import take_diagonals

Array = jax.Array
_LETTERS = string.ascii_letters


@jax.tree_util.register_pytree_node_class
class RadialTensor:
    """Symmetric degree-d tensor ``Sym(core (x) M^{(x)r})``, ``d = core.ndim + 2r``.

    core: ``(n,)*s`` symmetric array. metric M: None (identity), ``(n,)`` (diagonal) or ``(n, n)``.
    With ``r = 0`` this is just the dense tensor ``core``.
    """

    def __init__(self, core: Array, r: int = 0, metric: Array | None = None, n: int | None = None):
        self.core, self.r, self.metric = core, r, metric
        self.n = n if n is not None else (core.shape[0] if core.ndim else metric.shape[0])

    def tree_flatten(self):
        return (self.core, self.metric), (self.r, self.n)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], aux[0], children[1], aux[1])

    @property
    def degree(self) -> int:
        return self.core.ndim + 2 * self.r

    def __repr__(self):
        m = None if self.metric is None else self.metric.shape
        return f"RadialTensor(degree={self.degree}, core={self.core.shape}, r={self.r}, metric={m})"

    def _metric_matrix(self) -> Array:
        if self.metric is None:
            return jnp.eye(self.n, dtype=self.core.dtype)
        return jnp.diag(self.metric) if self.metric.ndim == 1 else self.metric

    def _metric_diag(self) -> Array:
        if self.metric is None:
            return jnp.ones(self.n, self.core.dtype)
        return self.metric if self.metric.ndim == 1 else jnp.diagonal(self.metric)

    def dense(self) -> Array:
        """The full ``(n,)*d`` array (O(n^d) memory)."""
        if self.r == 0:
            return self.core
        d, s = self.degree, self.core.ndim
        metric, out, count = self._metric_matrix(), 0.0, 0
        for core_pos in itertools.combinations(range(d), s):
            rest = tuple(p for p in range(d) if p not in core_pos)
            for pairs in dg.perfect_matchings(rest):
                subs = ["".join(_LETTERS[p] for p in core_pos)] + [_LETTERS[a] + _LETTERS[b] for a, b in pairs]
                out = out + jnp.einsum(",".join(subs) + "->" + _LETTERS[:d], self.core, *[metric] * len(pairs))
                count += 1
        return out / count

    def slice(self, pattern: dg.Vec) -> Array:
        """Entries at ``m`` distinct neurons repeated ``pattern`` times: an ``(n,)*m`` array
        (entries where neurons coincide are not meaningful)."""
        m = len(pattern)
        if self.r == 0:
            return diagonal(self.core, [j for j, x in enumerate(pattern) for _ in range(x)], m, self.n)
        full = self.metric is not None and self.metric.ndim == 2
        diag = self._metric_diag()
        total = 0.0
        for coef, a, edges in dg.radial_slice_terms(tuple(pattern), self.r, full):
            term = coef * diagonal(self.core, [j for j, x in enumerate(a) for _ in range(x)], m, self.n)
            for j, l in edges:
                term = term * (place(diag, (j,), m, self.n) if j == l else place(self.metric, (j, l), m, self.n))
            total = total + term
        return jnp.broadcast_to(total, (self.n,) * m)


def diagonal(core: Array, slot_of_axis: Sequence[int], m: int, n: int) -> Array:
    """``out[i_1..i_m] = core[i_{slot_of_axis[0]}, i_{slot_of_axis[1]}, ...]``, broadcast over the
    slots no axis names: a generalized diagonal by strided views and one transpose (O(n^m), not
    O(n^ndim); a gather would build an (n,)*m x ndim index array)."""
    if not slot_of_axis:
        return core
    core, labels = take_diagonals(core, tuple(slot_of_axis))  # axes of one slot: their diagonal
    core = jnp.transpose(core, sorted(range(len(labels)), key=lambda t: labels[t]))
    return jnp.reshape(core, [n if j in labels else 1 for j in range(m)])


def place(x: Array, slots: Sequence[int], m: int, n: int) -> Array:
    """Broadcast an array whose axes are the increasing ``slots`` onto ``m`` slot axes."""
    return jnp.reshape(x, [n if j in slots else 1 for j in range(m)])
