"""The nonlinear step with the top cumulant (k_max 3 or 4) in low-rank form."""

from __future__ import annotations

import functools
import itertools
import math
from collections import Counter

import jax
import jax.numpy as jnp

from . import diagrams as dg
from ._fusion import materialize
from .lowrank import FactoredTensor, Net, contract, from_leaf_groups, refactor
from .nonlinear import NonlinearStep, sorted_piece, sorted_view, zero_coincident
from .radial import RadialTensor, diagonal

Array = jax.Array


@functools.cache
def _diagram_classes(
    alpha: dg.Vec, k: int, kind: str, degrees: frozenset
) -> tuple[tuple[float, tuple[dg.Vec, ...]], ...]:
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


def _tied_scale(fs) -> list | None:
    """For a k = 3 term split at leaf slot 0 (neighbour 1): the factors on slot 1 alone that
    make its rest the leaf factor again, ``X[r, j] = s[r] E[j, r]`` (the factors touching 0 moved
    to slot 2, times ``s``), or None when the rest is not of that form."""

    def move(lab, sym):  # slot 0 -> 2 (a symmetric factor's labels stay sorted)
        lab = tuple(2 if l == 0 else l for l in lab)
        return tuple(sorted(lab)) if sym else lab

    wanted = Counter((id(a), move(lab, sym)) for a, lab, sym in fs if 0 in lab)
    scale = []
    for a, lab, _ in fs:
        if 0 in lab:
            continue
        if wanted[(id(a), lab)] > 0:
            wanted[(id(a), lab)] -= 1
        elif set(lab) == {1}:
            scale.append((a, lab))
        else:
            return None
    return scale if not +wanted else None


class FactoredStep(NonlinearStep):
    """The nonlinear step with the top degree k = k_max (3 or 4) in low-rank form.

    Slices on fewer than k slots are dense as in :class:`NonlinearStep` (the factored input's
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
        full = self._cached(("b", srt), lambda: self._input_slice(t, srt))
        return full if srt == pattern else self._cached(("b", pattern), lambda: sorted_view(lambda _: full, pattern))

    def _input_slice(self, t: FactoredTensor, pattern) -> Array:
        """Slice of an input tensor; of the top one under ``rank_layers``, as the slice of the
        blocks the truncation drops (cached: the truncated top subtracts it) plus the rest's,
        so every inherited rank is contracted once."""
        old = self._dropped_blocks(t)
        if not old:
            return t.slice(pattern, self.memo)
        dropped, kept = t.split_blocks(old)
        out = self._cached(("dropped", pattern), lambda: dropped.slice(pattern, self.memo))
        return out + kept.slice(pattern, self.memo) if kept.blocks else out

    def _dropped_blocks(self, t) -> int:
        """How many of the input top's oldest rank blocks ``rank_layers`` drops (0: none)."""
        m = self.cfg.rank_layers
        if m is None or not isinstance(t, FactoredTensor) or t is not self.tower.get(self.k) or len(t.blocks) < m:
            return 0
        classes = _diagram_classes(self.top, self.k, self.cfg.kind, self.degrees)
        if not any(blocks == (self.top,) for _, blocks in classes):  # the input top does not reach the new one
            return 0
        return len(t.blocks) - (m - 1)

    def _leg_scale(self, pattern) -> Array:
        """``prod_j wick(1, 1)[i_j] ** pattern[j]``: a slice's factor from scaling every leg."""
        w = self.wick(1, 1)
        return math.prod(
            jnp.reshape(w**c, [self.n if t == j else 1 for t in range(len(pattern))]) for j, c in enumerate(pattern)
        )

    def block_piece(self, pattern, slots):
        t = self.tower[sum(pattern)]
        if not isinstance(t, FactoredTensor):
            return super().block_piece(pattern, slots)
        # the sorted slice (computed once) with its axes labelled: no transposed copy
        v = [0] * (max(slots) + 1)
        for j, x in zip(slots, pattern):
            v[j] = x
        return sorted_piece(self.block, tuple(v))

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
            core = diagonal(t.core, [asl.index(j) for j in range(m) for _ in range(a[j])], len(asl), n)
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
                        pk = sorted_view(self.power_cumulant, tuple(v[j] for j in slots))
                        term = term * Net.leaf(m, pk, slots)
                total = total + term
            return total

        return self._cached(("knet", alpha), build)

    def top_factored(self) -> FactoredTensor:
        """All-distinct slice of the new top cumulant (= its power cumulant) in factored form."""

        def build():
            coefs, leaves = self._top_parts()
            # one scaled copy of the input's top for all its diagrams (they differ by a scalar)
            out = [self.tower[self.k].scale_legs(self.wick(1, 1), sum(coefs))] if coefs else []
            out += [leaves] if leaves else []
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
            total = total + sum(coefs) * self.block(tuple(pattern)) * self._leg_scale(pattern)
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
            if not groups:
                return coefs, None
            dt = self.mean.dtype
            # k = 3 terms whose rest is the leaf factor again times a per-neuron scale (the chain
            # through a repeated block, e.g. simple's w1 K w2 K w1): stored as E (x) E (x) s e.
            tied = all(s is not None for _, terms in groups.values() for _, _, s in terms)
            rest = (
                (lambda terms: sum(c * (contract(s, (1,), n, dt) if s else jnp.ones(n, dt)) for c, _, s in terms))
                if tied
                else (lambda terms: sum(c * contract(X, range(1, k), n, dt) for c, X, _ in terms))
            )
            leaves = [(contract(E, (0, 1), n, dt), rest(terms)) for E, terms in groups.values()]
            return coefs, from_leaf_groups(leaves, k, n, tied=tied)

        return self._cached(("top parts",), build)

    def _add_leaf_term(self, groups, c, fs):
        """Split a hypertree term at a leaf slot i (all its factors within one pair {i, j}):
        relabel i -> 0, j -> 1, and add ``(c, X, s)`` (X: the rest, over slots 1..k-1; s: see
        :func:`_tied_scale`) to the group of its leaf factor E (the factors on {0, 1} touching 0)."""
        k = self.k
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
        groups.setdefault(key, (E, []))[1].append((c, X, _tied_scale(fs) if k == 3 else None))

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
                total = total + sorted_view(self.cumulant, beta[:i] + (beta[i] + 2,) + beta[i + 1 :])
            last = beta + (2,)
            order = sorted(range(m + 1), key=lambda s: -last[s])
            net = self.cumulant_net(tuple(last[s] for s in order)).relabel({t: order[t] for t in range(m + 1)})
            # power_net kept one diagram per class of equal-power slots: symmetrise over them.
            perms = [p for p in itertools.permutations(range(m)) if all(beta[p[s]] == beta[s] for s in range(m))]
            summed = materialize(net.masked_sum_last(self.n, self.mean.dtype, perms, self.memo))
            summed = sum(jnp.transpose(summed, p) for p in perms) / len(perms)
            return total + zero_coincident(summed)

        return self._cached(("t", d, j, beta), build)

    def output_degree(self, d, r):
        if d != self.k:
            return super().output_degree(d, r)
        # Non-top slices: the true dense ones minus what the factored top already puts there,
        # re-factored (rank n) and appended as part of this layer's new rank block.
        top, top_slice = self.top_factored(), self.top_slice
        if self.cfg.rank_layers is not None:
            top, top_slice = self._truncated_top(self.cfg.rank_layers)
        slices = {
            beta: zero_coincident(self.cumulant(beta) - top_slice(beta))
            for beta in dg.int_partitions(d)
            if beta != self.top
        }
        out = top.concat(refactor(slices, d, self.n, self.mean.dtype))
        new = 2 if self._top_parts()[1] is not None else 1  # leaf groups + re-factored slices: one block
        return out.merged_blocks(len(out.blocks) - new)

    def _truncated_top(self, m: int):
        """The new top without the inherited rank blocks older than the last ``m - 1`` layers
        (``rank_layers = m``), and its slice function. Only its all-distinct part is dropped: the
        re-factored non-top slices are taken against this truncated top, so they stay exact."""
        coefs, leaves = self._top_parts()
        inherited = self.tower.get(self.k)
        old = self._dropped_blocks(inherited)
        if not old:
            return self.top_factored(), self.top_slice  # nothing to drop
        c = sum(coefs)
        kept = inherited.split_blocks(old)[1].scale_legs(self.wick(1, 1), c) if m > 1 else None
        top = leaves if kept is None else kept.concat(leaves) if leaves else kept
        if inherited.rank - (kept.rank if kept is not None else 0) >= top.rank:
            return top, top.slice

        def dropped_slice(beta):
            beta = tuple(beta)
            assert beta == tuple(sorted(beta, reverse=True)), "the dropped slices are cached in sorted order"
            self.block(beta)  # computes and caches the dropped blocks' slice
            return c * self._memo[("dropped", beta)] * self._leg_scale(beta)

        return top, lambda beta: self.top_slice(beta) - dropped_slice(beta)
