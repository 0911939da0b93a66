"""Cumulant propagation through an MLP: exact linear steps, truncated Wick expansion at each
nonlinearity (ARC, arXiv 2605.05179).

Between layers the state is a *tower*: ``{degree d: RadialTensor}`` holding the joint cumulants of
one layer up to the tracked degree. All combinatorics (which slices, diagrams, contractions) is
decided in Python at trace time from the static configuration, so under ``jax.jit`` one fused
program is compiled per (network shape, configuration).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import string
from collections import Counter, defaultdict
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import diagrams as dg
from . import activations as _act
from .factored import FactoredTensor, Net, contract, from_leaf_groups, refactor

Array = jax.Array
_LETTERS = string.ascii_letters


@dataclasses.dataclass(frozen=True)
class PropagationConfig:
    """Static configuration of one estimator (hashable: usable as a static jit argument).

    k_max: accuracy budget (the paper's K), 1..4; squared error ~ width^-k_max.
    kind: term set, ``"simple"`` or ``"augment"``.
    avg_metric: after hidden linear layers use E[W^T W] = w_var I instead of W^T W for the
        radial pieces (only matters where a degree is kept in radial form).
    factored: keep the top cumulant (k_max 3 or 4) in low-rank form (:class:`FactoredTensor`,
        rank growing ~width per layer) with the factored term set (equal to unfactored for
        ``simple``; for ``augment`` it drops the diagrams that admit no low-rank evaluation): cost
        and memory drop by a factor of width. Ignored for k_max <= 2.
    output_degree: highest degree passed through the output layer (None: all tracked).
    """

    k_max: int = 2
    kind: str = "simple"
    avg_metric: bool = False
    factored: bool = False
    output_degree: int | None = None

    def __post_init__(self):
        if self.k_max not in (1, 2, 3, 4):
            raise ValueError(f"k_max must be 1, 2, 3 or 4, got {self.k_max!r}")
        dg.check_kind(self.kind)
        if self.output_degree is not None and self.output_degree < 1:
            raise ValueError(f"output_degree must be >= 1 or None, got {self.output_degree}")

    @property
    def name(self) -> str:
        fac = "_fac" if self.factored and self.k_max >= 3 else ""
        avg = "_avg" if self.avg_metric else ""
        return f"k{self.k_max}_{self.kind}{fac}{avg}"


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
            return _diagonal(self.core, [j for j, x in enumerate(pattern) for _ in range(x)], m, self.n)
        full = self.metric is not None and self.metric.ndim == 2
        diag = self._metric_diag()
        total = 0.0
        for coef, a, edges in dg.radial_slice_terms(tuple(pattern), self.r, full):
            term = coef * _diagonal(self.core, [j for j, x in enumerate(a) for _ in range(x)], m, self.n)
            for j, l in edges:
                term = term * (_place(diag, (j,), m, self.n) if j == l else _place(self.metric, (j, l), m, self.n))
            total = total + term
        return jnp.broadcast_to(total, (self.n,) * m)


def _diagonal(core: Array, slot_of_axis: Sequence[int], m: int, n: int) -> Array:
    """``out[i_1..i_m] = core[i_{slot_of_axis[0]}, i_{slot_of_axis[1]}, ...]``, broadcast over the
    slots no axis names: a generalized diagonal read by one gather (O(n^m), not O(n^ndim))."""
    if not slot_of_axis:
        return core
    ar = jnp.arange(n)
    return core[tuple(jnp.reshape(ar, [n if t == j else 1 for t in range(m)]) for j in slot_of_axis)]


Tower = dict  # degree -> RadialTensor
_ROW_BLOCK_ENTRIES = 1 << 18  # slices larger than this are summed in blocks of rows


# ----------------------------------------------------------------------------- linear step


def _linear_step(tower: Tower, W: Array, b: Array | None, metric, degrees) -> Tower:
    """Exact affine map ``x -> x @ W + b`` of every tracked cumulant.

    Each leg of a core is contracted with W; radial pieces get the new metric, one of
    ``"exact"`` (W^T W), ``"diag"`` (its diagonal, enough at k_max = 1 where only traces are
    consumed) or a float (the average metric ``w_var * I``).
    """
    out = {}
    for d, t in tower.items():
        if d not in degrees:
            continue
        if isinstance(t, FactoredTensor):
            out[d] = t.linear(W)
            continue
        core = t.core
        for _ in range(core.ndim):  # one leg at a time: axes cycle back to their order
            core = jnp.tensordot(core, W, axes=([0], [0]))
        new_metric = None
        if t.r:
            if isinstance(metric, str) and metric == "exact":
                new_metric = W.T @ W
            elif isinstance(metric, str) and metric == "diag":
                new_metric = jnp.sum(W * W, axis=0)
            else:
                new_metric = jnp.full((W.shape[1],), metric, W.dtype)
        out[d] = RadialTensor(core, t.r, new_metric, W.shape[1])
    if b is not None:
        out[1] = RadialTensor(out[1].core + b)
    return out


# ----------------------------------------------------------------------------- nonlinear step


def _place(x: Array, slots: Sequence[int], m: int, n: int) -> Array:
    """Broadcast an array whose axes are the increasing ``slots`` onto ``m`` slot axes."""
    return jnp.reshape(x, [n if j in slots else 1 for j in range(m)])


def _zero_coincident(x: Array) -> Array:
    """Zero the entries of an ``(n,)*m`` slice where two slot indices coincide."""
    m = x.ndim
    if m < 2:
        return x
    idx = [jax.lax.broadcasted_iota(jnp.int32, x.shape, j) for j in range(m)]
    keep = math.prod(idx[a] != idx[b] for a, b in itertools.combinations(range(m), 2))
    return jnp.where(keep, x, 0.0)


def _sorted_view(get, pattern: dg.Vec) -> Array:
    """``get(sorted pattern)`` with its axes permuted into the order of ``pattern``."""
    order = sorted(range(len(pattern)), key=lambda j: -pattern[j])
    x = get(tuple(pattern[j] for j in order))
    return jnp.transpose(x, [order.index(j) for j in range(len(pattern))])


class _NonlinearStep:
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
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    def wick(self, order: int, power: int) -> Array:
        return self._cached(("w", order, power), lambda: _act.gaussian_expectation(self.act, order, power, self.mean, self.var))

    def block(self, pattern: dg.Vec) -> Array:
        return self._cached(("b", pattern), lambda: self.tower[sum(pattern)].slice(pattern))

    def power_cumulant(self, alpha: dg.Vec) -> Array:
        """Slice ``alpha`` (sorted) of the joint cumulants of powers of phi(Z): the diagram sum."""

        def build():
            m, n, cfg = len(alpha), self.n, self.cfg
            by_orders = defaultdict(list)
            for t in dg.diagrams(alpha, cfg.k_max, cfg.kind, self.degrees, cfg.factored):
                by_orders[t.orders].append(t)
            factors, plan = {}, []  # broadcastable factor arrays; per Wick orders: terms and Wick keys
            for orders, group in by_orders.items():
                terms = []
                for t in group:
                    keys = []
                    for v in t.blocks:
                        slots = tuple(j for j in range(m) if v[j])
                        key = ("b", tuple(v[j] for j in slots), slots)
                        if key not in factors:
                            factors[key] = _place(self.block(key[1]), slots, m, n)
                        keys.append(key)
                    terms.append((t.coef, keys))
                wick_keys = []
                for j, (o, p) in enumerate(zip(orders, alpha)):
                    key = ("w", o, p, j)
                    if key not in factors:
                        factors[key] = _place(self.wick(o, p), (j,), m, n)
                    wick_keys.append(key)
                plan.append((terms, wick_keys))

            def evaluate(f, shape):
                total = jnp.zeros(shape, self.mean.dtype)
                for terms, wick_keys in plan:
                    inner = 0.0
                    for coef, keys in terms:
                        prod = coef
                        for key in keys:
                            prod = prod * f[key]
                        inner = inner + prod
                    for key in wick_keys:
                        inner = inner * f[key]
                    total = total + inner
                return total

            if m < 4 or n ** m <= _ROW_BLOCK_ENTRIES:
                return evaluate(factors, (n,) * m)
            # Large 4-slot slices (k_max = 4): sum the diagrams block of rows by block of rows so
            # every intermediate stays cache-sized instead of streaming O(terms) full (n,)^4 arrays
            # through memory (measured 1.7x faster at width 64; for 3-slot slices it was slower).
            rows = max(d for d in range(1, n + 1) if n % d == 0 and d * n ** (m - 1) <= _ROW_BLOCK_ENTRIES) if n ** (m - 1) <= _ROW_BLOCK_ENTRIES else 1

            def block(i):
                f = {k: jax.lax.dynamic_slice_in_dim(x, i * rows, rows, 0) if x.shape[0] == n else x for k, x in factors.items()}
                return evaluate(f, (rows,) + (n,) * (m - 1))

            return jax.lax.map(block, jnp.arange(n // rows)).reshape((n,) * m)

        return self._cached(("p", alpha), build)

    def cumulant(self, alpha: dg.Vec) -> Array:
        """Slice ``alpha`` (sorted) of the cumulants of phi(Z), zero on coincident indices."""

        def build():
            m, n = len(alpha), self.n
            total = 0.0
            for coef, pieces in dg.cumulant_from_power_cumulants(alpha):
                prod = coef
                for v in pieces:
                    slots = [j for j in range(m) if v[j]]
                    pk = _sorted_view(self.power_cumulant, tuple(v[j] for j in slots))
                    prod = prod * _place(pk, slots, m, n)
                total = total + prod
            return _zero_coincident(jnp.broadcast_to(total, (n,) * m))

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
                total = total + _sorted_view(prev, beta[:i] + (beta[i] + 2,) + beta[i + 1 :])
            return total + jnp.sum(_sorted_view(prev, beta + (2,)), axis=-1)

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
            flat = sum(jnp.reshape(ar, [n if t == slot_of_leg[p] else 1 for t in range(m)]) * n ** (d - 1 - p) for p in range(d))
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


@functools.lru_cache(maxsize=None)
def _diagram_classes(alpha: dg.Vec, k: int, kind: str, degrees: frozenset) -> tuple[tuple[float, tuple[dg.Vec, ...]], ...]:
    """The factored term set's diagrams of slice ``alpha`` up to permutations of slots with equal
    ``alpha``: ``(coef * class size, canonical blocks)``. Summed and then symmetrised over those
    slots they give the full diagram sum."""
    m = len(alpha)
    perms = [p for p in itertools.permutations(range(m)) if all(alpha[p[s]] == alpha[s] for s in range(m))]
    classes = Counter()
    for t in dg.diagrams(alpha, k, kind, degrees, True):
        canon = min(tuple(sorted(tuple(v[p] for p in perm) for v in t.blocks)) for perm in perms)
        classes[(t.coef, canon)] += 1
    return tuple((coef * count, blocks) for (coef, blocks), count in sorted(classes.items()))


class _FactoredStep(_NonlinearStep):
    """The nonlinear step with the top degree k = k_max (3 or 4) in low-rank form.

    Slices on fewer than k slots are dense as in :class:`_NonlinearStep` (the factored input's
    non-top slices are read from its factors). Slices on k slots are never materialised: the
    all-distinct slice of the new top cumulant goes straight to factored form (hypertree diagrams,
    each split at a leaf slot as ``E[i, j] X[j, ...]``), and the other k-slot slices (augment only)
    are tensor networks contracted by the traces that consume them.
    """

    def __init__(self, tower, activation, config):
        super().__init__(tower, activation, config)
        self.k = config.k_max
        self.top = (1,) * self.k
        self.memo: dict = {}  # contractions of this step, shared between slices and traces

    def block(self, pattern):
        t = self.tower[sum(pattern)]
        if not isinstance(t, FactoredTensor):
            return super().block(pattern)
        assert len(pattern) < self.k, "the all-distinct top slice exists only in factored form"
        # One O(n^m R) slice per multiset of multiplicities; other orders are transposes of it.
        pattern = tuple(pattern)
        srt = tuple(sorted(pattern, reverse=True))
        full = self._cached(("b", srt), lambda: t.slice(srt, self.memo))
        return full if srt == pattern else self._cached(("b", pattern), lambda: _sorted_view(lambda _: full, pattern))

    def power_cumulant(self, alpha):
        assert len(alpha) < self.k, "k-slot power cumulants are networks (power_net)"
        return super().power_cumulant(alpha)

    # ---- k-slot networks

    def block_net(self, v) -> Net:
        """Block ``v`` (a vector over the k slots) as a network."""
        m = self.k
        slots = tuple(j for j in range(m) if v[j])
        pattern = tuple(v[j] for j in slots)
        t = self.tower[sum(pattern)]
        if len(slots) < m:
            return Net.leaf(m, self.block(pattern), slots, len(set(pattern)) == 1)
        if isinstance(t, FactoredTensor):
            return t.net(slots, m)
        # A radial block on all k slots: its slice terms are products of core diagonals and
        # metric edges on fewer slots (paper sec. 5.3), kept as separate factors.
        return self._cached(("rnet", pattern), lambda: self._radial_net(t, pattern))

    def _radial_net(self, t: RadialTensor, pattern) -> Net:
        m, n = len(pattern), self.n
        full = t.metric is not None and t.metric.ndim == 2
        diag = t._metric_diag()
        terms = []
        for coef, a, edges in dg.radial_slice_terms(tuple(pattern), t.r, full):
            asl = [j for j in range(m) if a[j]]
            core = _diagonal(t.core, [asl.index(j) for j in range(m) for _ in range(a[j])], len(asl), n)
            fs = [(jnp.reshape(core, (n,) * len(asl)), tuple(asl), len({a[j] for j in asl}) <= 1)]
            for j, l in edges:
                fs.append((diag, (j,), True) if j == l else (t.metric, tuple(sorted((j, l))), True))
            terms.append((coef, tuple(fs)))
        return Net(m, terms)

    def wick_net(self, orders, alpha) -> Net:
        fs = tuple((self.wick(o, p), (j,), True) for j, (o, p) in enumerate(zip(orders, alpha)))
        return Net(self.k, [(1.0, fs)])

    def power_net(self, alpha) -> Net:
        """Power-cumulant slice ``alpha`` (k slots, not all ones) as a network: the diagram sum
        with one representative per class of diagrams related by a permutation of equal-power
        slots, so it equals the true slice only after symmetrising over those slots (which its
        consumer, :meth:`traced`, does)."""

        def build():
            total = Net(self.k)
            for coef, blocks in _diagram_classes(alpha, self.cfg.k_max, self.cfg.kind, self.degrees):
                orders = tuple(sum(v[j] for v in blocks) for j in range(self.k))
                term = self.wick_net(orders, alpha) * coef
                for v in blocks:
                    term = term * self.block_net(v)
                total = total + term
            return total

        return self._cached(("pnet", alpha), build)

    def cumulant_net(self, alpha) -> Net:
        """Cumulant slice ``alpha`` (k slots) as a network (not zeroed on coincident indices)."""

        def build():
            m, total = self.k, Net(self.k)
            for coef, pieces in dg.cumulant_from_power_cumulants(alpha):
                term = Net(m, [(coef, ())])
                for v in pieces:
                    slots = tuple(j for j in range(m) if v[j])
                    if len(slots) == m:
                        term = term * (self.top_factored().net(range(m), m) if v == self.top else self.power_net(v))
                    else:
                        pk = _sorted_view(self.power_cumulant, tuple(v[j] for j in slots))
                        term = term * Net.leaf(m, pk, slots)
                total = total + term
            return total

        return self._cached(("knet", alpha), build)

    def top_factored(self) -> FactoredTensor:
        """All-distinct slice of the new top cumulant (= its power cumulant) in factored form."""

        def build():
            coefs, leaves = self._top_parts()
            out = [self.tower[self.k].scale_legs(self.wick(1, 1), c) for c in coefs] + ([leaves] if leaves else [])
            res = out[0]
            for f in out[1:]:
                res = res.concat(f)
            return res

        return self._cached(("top",), build)

    def top_slice(self, pattern) -> Array:
        """``top_factored().slice(pattern)``. Augment's k-slot traces contract the new top itself,
        so there its slices share their contractions through the memo (k4 augment at width 256:
        4.14e12 FLOPs against 4.76e12 the other way); simple reads the input's scaled top block
        from the cached input slice (``block``) instead of contracting it again over its ranks
        (k4 simple: 6.08e11 against 8.16e11)."""
        if self.cfg.kind == "augment":
            return self.top_factored().slice(pattern, self.memo)
        coefs, leaves = self._top_parts()
        total = leaves.slice(pattern) if leaves else 0.0
        if coefs:
            w = self.wick(1, 1)
            scale = math.prod(jnp.reshape(w ** c, [self.n if t == j else 1 for t in range(len(pattern))]) for j, c in enumerate(pattern))
            total = total + sum(coefs) * self.block(tuple(pattern)) * scale
        return total

    def _top_parts(self) -> tuple[list[float], FactoredTensor | None]:
        """The new top cumulant as ``Sym(sum_c c * input top scaled by wick(1, 1) on every leg)``
        (its coefficients ``c``) plus the rank-n leaf groups of the other diagrams (or None)."""

        def build():
            k, n = self.k, self.n
            # Isomorphic diagrams contribute the same symmetrised term: keep one per class.
            coefs = []  # the input's own top block, scaled on every leg
            groups: dict = {}  # leaf factor key -> (E factors, summed X)
            for coef, blocks in _diagram_classes(self.top, k, self.cfg.kind, self.degrees):
                orders = tuple(sum(v[j] for v in blocks) for j in range(k))
                if len(blocks) == 1 and isinstance(self.tower[k], FactoredTensor) and blocks[0] == self.top:
                    coefs.append(coef)
                    continue
                term = self.wick_net(orders, self.top) * coef
                for v in blocks:
                    term = term * self.block_net(v)
                for c, fs in term.terms:
                    self._add_leaf_term(groups, c, fs)
            leaves = from_leaf_groups([(contract(E, (0, 1), n, self.mean.dtype), X) for E, X in groups.values()], k, n) if groups else None
            return coefs, leaves

        return self._cached(("top parts",), build)

    def _add_leaf_term(self, groups, c, fs):
        """Split a hypertree term at a leaf slot i (all its factors within one pair {i, j}):
        relabel i -> 0, j -> 1, and add ``c * X`` (the rest, dense over slots 1..k-1) to the
        group of its leaf factor E (the factors on {0, 1} touching 0)."""
        k, n = self.k, self.n
        nbrs = {i: set() for i in range(k)}
        for _, lab, _ in fs:
            for i in lab:
                nbrs[i] |= set(lab) - {i}
        leaves = [i for i in range(k) if len(nbrs[i]) == 1] + [i for i in range(k) if not nbrs[i]]
        if not leaves:
            raise AssertionError(f"term without a leaf slot: {[lab for _, lab, _ in fs]}")
        i = leaves[0]
        j = next(iter(nbrs[i])) if nbrs[i] else min(s for s in range(k) if s != i)
        order = [i, j] + [s for s in range(k) if s not in (i, j)]
        mp = {old: new for new, old in enumerate(order)}
        fs = [(a, tuple(sorted(mp[l] for l in lab)) if sym else tuple(mp[l] for l in lab), sym) for a, lab, sym in fs]
        E = [(a, lab) for a, lab, _ in fs if 0 in lab]
        X = [(a, lab) for a, lab, _ in fs if 0 not in lab]
        key = tuple(sorted((id(a), lab) for a, lab in E))
        x = c * contract(X, range(1, k), n, self.mean.dtype)
        if key in groups:
            groups[key] = (groups[key][0], groups[key][1] + x)
        else:
            groups[key] = (E, x)

    # ---- consumers of k-slot slices

    def cumulant(self, alpha):
        if len(alpha) == self.k:
            raise AssertionError("k-slot cumulant slices are networks (cumulant_net)")
        return super().cumulant(alpha)

    def traced(self, d, j, beta):
        if j == 0 or len(beta) + 1 < self.k:
            return super().traced(d, j, beta)
        assert j == 1 and len(beta) + 1 == self.k, (d, j, beta)

        def build():
            m = len(beta)
            total = 0.0
            for i in range(m):
                total = total + _sorted_view(self.cumulant, beta[:i] + (beta[i] + 2,) + beta[i + 1 :])
            last = beta + (2,)
            order = sorted(range(m + 1), key=lambda s: -last[s])
            net = self.cumulant_net(tuple(last[s] for s in order)).relabel({t: order[t] for t in range(m + 1)})
            # power_net kept one diagram per class of equal-power slots: symmetrise over them.
            perms = [p for p in itertools.permutations(range(m)) if all(beta[p[s]] == beta[s] for s in range(m))]
            summed = net.masked_sum_last(self.n, self.mean.dtype, perms, self.memo)
            summed = sum(jnp.transpose(summed, p) for p in perms) / len(perms)
            return total + _zero_coincident(summed)

        return self._cached(("t", d, j, beta), build)

    def output_degree(self, d, r):
        if d != self.k:
            return super().output_degree(d, r)
        # Non-top slices: the true dense ones minus what the factored top already puts there,
        # re-factored (rank n) and appended.
        slices = {beta: _zero_coincident(self.cumulant(beta) - self.top_slice(beta)) for beta in dg.int_partitions(d) if beta != self.top}
        return self.top_factored().concat(refactor(slices, d, self.n, self.mean.dtype))


# ----------------------------------------------------------------------------- driver


def _layers(params) -> list[tuple[Array, Array | None]]:
    if isinstance(params, (list, tuple)):
        return [(W, b) for W, b in params]
    from .mlp import layer_weights

    return layer_weights(params)


def input_tower(mean: Array, cov: Array, config: PropagationConfig) -> Tower:
    """The Gaussian input N(mean, cov) as a tower (higher cumulants vanish)."""
    n = mean.shape[0]
    if dg.radial_index(2, config.k_max, config.kind) == 0:
        return {1: RadialTensor(mean), 2: RadialTensor(cov)}
    # k_max = 1: only the trace of the covariance is carried.
    return {1: RadialTensor(mean), 2: RadialTensor(jnp.trace(cov) / n, 1, None, n)}


def labels(num_layers: int) -> list[str]:
    out = []
    for l in range(num_layers):
        out += [f"pre{l}"] + ([f"act{l}"] if l < num_layers - 1 else [])
    return out


def propagate(
    params,
    activations: Sequence[str],
    mean: Array,
    cov: Array,
    config: PropagationConfig = PropagationConfig(),
    weight_variances: Sequence[float] | None = None,
    unroll: bool = False,
) -> dict[str, Tower]:
    """Cumulants of every layer of an MLP on the Gaussian input N(mean, cov).

    params: Flax variables of :class:`cumjax.MLP` (or list of ``(W (in,out), b)``).
    activations: one name per hidden layer (``num_layers - 1``).
    mean ``(d_in,)``, cov ``(d_in, d_in)``: the input distribution.
    weight_variances: per linear layer ``fan_in * Var(W)`` (needed with ``avg_metric``).
    unroll: trace every layer separately instead of scanning over equal hidden layers (longer
        compile; XLA's cost analysis then counts every layer).
    Returns ``{label: {degree: RadialTensor}}`` for labels ``pre0, act0, ..., pre{L-1}``.
    Pure and traceable: jit with ``activations``/``config`` static, vmap over params, grad.
    """
    layers = _layers(params)
    activations = tuple(activations)
    _validate(layers, activations, mean, cov, config, weight_variances)
    tower = input_tower(mean, cov, config)
    radial = any(r > 0 for r in dg.tracked_degrees(config.k_max, config.kind).values())

    def hidden_metric(w_var):
        if not radial:
            return 1.0  # no radial pieces are tracked: the metric is never read
        if config.avg_metric:
            return w_var
        return "diag" if config.k_max == 1 else "exact"

    factored = config.factored and config.k_max >= 3
    step = _FactoredStep if factored else _NonlinearStep

    def hidden_layer(tower, W, b, act, w_var):
        pre = _linear_step(tower, W, b, hidden_metric(w_var), list(tower))
        return pre, step(pre, act, config).output()

    L = len(layers)
    w_vars = [None] * L if weight_variances is None else [float(v) for v in weight_variances]
    out = {}
    # Hidden layers after the first share one tower structure: with equal shapes and
    # activations, scan over them so compile time does not grow with depth.
    scan_from, scan_to = 1, L - 1
    # The factored top cumulant's rank grows by O(n) per layer, so layers differ in shape and
    # cannot share a scan body; padding every layer to the last layer's rank would multiply the
    # early layers' cost (up to ~L/2 times on average), so the factored path is unrolled: compile
    # time grows with depth instead.
    scannable = not unroll and not factored and scan_to - scan_from >= 2 and len({activations[l] for l in range(scan_from, scan_to)}) == 1
    scannable = scannable and len({(layers[l][0].shape, layers[l][1] is None) for l in range(scan_from, scan_to)}) == 1
    l = 0
    while l < L - 1:
        if scannable and l == scan_from:
            stack = lambda xs: None if xs[0] is None else jnp.stack(xs)  # noqa: E731
            Ws = stack([layers[i][0] for i in range(scan_from, scan_to)])
            bs = stack([layers[i][1] for i in range(scan_from, scan_to)])
            vs = None if w_vars[scan_from] is None else jnp.asarray(w_vars[scan_from:scan_to], Ws.dtype)

            def body(tower, x, act=activations[scan_from]):
                W, b, v = x
                pre, post = hidden_layer(tower, W, b, act, v)
                return post, (pre, post)

            tower, (pres, posts) = jax.lax.scan(body, tower, (Ws, bs, vs))
            for i in range(scan_to - scan_from):
                out[f"pre{scan_from + i}"] = jax.tree_util.tree_map(lambda x: x[i], pres)
                out[f"act{scan_from + i}"] = jax.tree_util.tree_map(lambda x: x[i], posts)
            l = scan_to
            continue
        pre, tower = hidden_layer(tower, *layers[l], activations[l], w_vars[l])
        out[f"pre{l}"], out[f"act{l}"] = pre, tower
        l += 1
    W, b = layers[-1]
    keep = [d for d in tower if config.output_degree is None or d <= config.output_degree]
    out[f"pre{L - 1}"] = _linear_step(tower, W, b, "diag" if config.k_max == 1 else "exact", keep)
    return out


def estimate_mean(params, activations, mean, cov, config=PropagationConfig(), weight_variances=None) -> Array:
    """The estimated expected network output ``(d_out,)``."""
    config = dataclasses.replace(config, output_degree=1)
    return propagate(params, activations, mean, cov, config, weight_variances)[f"pre{len(_layers(params)) - 1}"][1].core


# ----------------------------------------------------------------------------- validation


def _concrete(x) -> bool:
    """A value we can inspect now (not a tracer or an abstract shape)."""
    return isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, jax.core.Tracer)


# Rank added per hidden layer, in units of the width, by the factored top cumulant (measured; the
# first hidden layer starts at 2n): leaf groups of the hypertree diagrams plus n for the
# re-factored non-top slices. tests/test_factored.py checks these against the real ranks.
_FACTORED_RANK_GROWTH = {(3, "simple"): 2, (4, "simple"): 2, (3, "augment"): 8, (4, "augment"): 10}


def factored_ranks(width: int, num_layers: int, config: PropagationConfig) -> list[int]:
    """Rank of the factored top cumulant after each hidden layer (an upper bound with avg_metric)."""
    g = _FACTORED_RANK_GROWTH[(config.k_max, config.kind)]
    return [width * (2 + g * l) for l in range(num_layers - 1)]


def estimated_bytes(width: int, num_layers: int, config: PropagationConfig, itemsize: int = 4) -> int:
    """Rough peak memory of propagation.

    Unfactored: the dense order-k cores of every stored layer plus the working slices of one
    nonlinear step. Factored (k_max 3/4): 3x (augment 6x) the factors of the two largest live layers plus
    dense working arrays of order k-1; when every degree is returned (``output_degree`` None or
    >= k) also every layer's stored factors. Modelled on a jitted call (``estimate_mean`` under
    ``jax.jit``); eager calls keep more intermediates alive.
    """
    n, k = width, config.k_max
    if not (config.factored and k >= 3):
        top = n**k
        working = 12 if config.kind == "augment" else 6
        return int((2 * num_layers + working) * top * itemsize)
    ranks = factored_ranks(n, num_layers, config) or [0]
    part = 3 * n if k == 3 else n * n + 2 * n  # floats per unit of rank
    everything = config.output_degree is None or config.output_degree >= k
    # Below the top degree at the output, the last hidden layer's top cumulant is dead code under
    # jit, so the two layers before it are the largest live ones.
    live_ranks = ranks[-2:] if everything or len(ranks) < 2 else ranks[-3:-1]
    # Input, output and working copies of the factors (contractions are summed over blocks of n
    # ranks, so their temporaries are small). k = 4, 5 layers, float32: XLA's buffer assignment
    # 10.4 / 1.31 GB augment at width 256 / 128 (model 10.8 / 1.36), 1.8 GB simple at 256.
    live = (4 if k == 4 else 3 if config.kind == "simple" else 6) * part * sum(live_ranks)
    dense = (24 if config.kind == "augment" else 12) * n ** (k - 1)
    stored = 2 * part * sum(ranks) if everything else 0
    return int((live + dense + stored + num_layers * n * n) * itemsize)


def available_bytes() -> int:
    """Memory a new allocation can get: Linux's MemAvailable (free pages plus reclaimable page
    cache; free pages alone undercount after file I/O), else the free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 34


def _validate(layers, activations, mean, cov, config, weight_variances):
    if not isinstance(config, PropagationConfig):
        raise TypeError(f"config must be a PropagationConfig, got {type(config).__name__}")
    if len(activations) != len(layers) - 1:
        raise ValueError(f"{len(layers)} linear layers need {len(layers) - 1} activations, got {len(activations)}")
    for a in activations:
        _act.check_activation(a)
    if config.avg_metric and weight_variances is None:
        raise ValueError("avg_metric=True needs weight_variances (fan_in * Var(W) per linear layer)")
    if weight_variances is not None and len(weight_variances) != len(layers):
        raise ValueError(f"weight_variances needs one entry per linear layer ({len(layers)})")
    mean, cov = jnp.asarray(mean), jnp.asarray(cov)
    d_in = layers[0][0].shape[0]
    if mean.shape != (d_in,) or cov.shape != (d_in, d_in):
        raise ValueError(f"input mean/cov must have shapes ({d_in},) and ({d_in}, {d_in}), got {mean.shape} and {cov.shape}")
    for l, (W, b) in enumerate(layers):
        if W.ndim != 2 or (l and W.shape[0] != layers[l - 1][0].shape[1]):
            raise ValueError(f"layer {l}: kernel shape {W.shape} does not chain with the previous layer")
        if b is not None and b.shape != (W.shape[1],):
            raise ValueError(f"layer {l}: bias shape {b.shape} != ({W.shape[1]},)")
    width = max(W.shape[1] for W, _ in layers)
    itemsize = jnp.zeros((), mean.dtype).dtype.itemsize
    need = estimated_bytes(width, len(layers), config, itemsize)
    if need > 0.8 * available_bytes():
        if config.factored and config.k_max >= 3:
            raise MemoryError(
                f"factored propagation at width {width}, k_max={config.k_max}, {len(layers)} layers needs about "
                f"{need / 2**30:.1f} GiB (rank-R factors, R growing ~width per layer), more than this machine has "
                f"free ({available_bytes() / 2**30:.1f} GiB); use a smaller width, depth or k_max, or output_degree=1"
            )
        raise MemoryError(
            f"unfactored propagation at width {width}, k_max={config.k_max} needs about {need / 2**30:.1f} GiB "
            f"(dense order-{config.k_max} cumulants, O(width^{config.k_max})), more than this machine has free "
            f"({available_bytes() / 2**30:.1f} GiB); use a smaller width or k_max, or the low-rank factored k=3/4 "
            f"variant (factored=True) that removes a factor of width"
        )
    if all(_concrete(x) for x in (mean, cov)):
        from .inputs import validate_gaussian_input

        validate_gaussian_input(mean, cov)
    for l, (W, b) in enumerate(layers):
        for name, x in (("kernel", W), ("bias", b)):
            if x is not None and _concrete(x) and not bool(jnp.all(jnp.isfinite(x))):
                raise ValueError(f"layer {l} {name} contains NaN or Inf")
