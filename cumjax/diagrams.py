"""Static combinatorics of cumulant propagation, enumerated once per configuration in Python.

Vocabulary (all objects are plain tuples so they can key caches):

* A *slice pattern* ``alpha = (a_1, ..., a_m)`` names the entries of a symmetric degree-``sum(alpha)``
  tensor where ``m`` distinct neurons ``i_1..i_m`` appear ``a_1..a_m`` times. A *slice* is the
  ``(n,)*m`` array of those entries (zero wherever two of the ``i`` coincide). Canonical patterns
  are sorted in decreasing order.
* A *block* ``v`` is a vector of multiplicities over the ``m`` output slots (zeros allowed): one
  input cumulant entry, broadcast over the slots it does not touch.
* A *diagram* is a multiset of blocks: one term of the Wick/Edgeworth expansion of a joint power
  cumulant ``cum(phi(Z_i1)^a_1, ..., phi(Z_im)^a_m)`` around the product Gaussian with the same
  per-neuron means and variances.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from fractions import Fraction
from functools import cache
from typing import NamedTuple

Vec = tuple[int, ...]

KINDS = ("simple", "augment")


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown term set {kind!r}; expected one of {KINDS}")
    return kind


# ----------------------------------------------------------------------------- what is tracked


def top_degree(k: int, kind: str) -> int:
    """Highest cumulant degree produced by the nonlinear step."""
    if check_kind(kind) == "simple":
        return k + 1 if k % 2 else k
    return k + 1 if k % 2 else k + 2


def radial_index(d: int, k: int, kind: str) -> int:
    """Radial index r kept for the degree-``d`` cumulant after a nonlinearity, or -1 to drop it.

    The cumulant is stored as ``Sym(core (x) M^{(x)r})`` with a core of order ``d - 2r``: only its
    harmonic components of radial index >= r survive (power counting, paper sec. 5.3).
    """
    if d <= k:
        return 0
    if d == k + 1:
        if check_kind(kind) == "augment":
            return 1
        return d // 2 if d % 2 == 0 else -1
    if d == k + 2 and check_kind(kind) == "augment" and d % 2 == 0:
        return d // 2
    return -1


def tracked_degrees(k: int, kind: str) -> dict[int, int]:
    """Degree -> radial index for every degree kept after a nonlinearity."""
    out = {d: radial_index(d, k, kind) for d in range(1, top_degree(k, kind) + 1)}
    return {d: r for d, r in out.items() if r >= 0}


@cache
def int_partitions(d: int, largest: int | None = None) -> tuple[Vec, ...]:
    """Integer partitions of ``d`` with parts in decreasing order."""
    largest = d if largest is None else largest
    if d == 0:
        return ((),)
    return tuple((p,) + rest for p in range(min(d, largest), 0, -1) for rest in int_partitions(d - p, p))


@cache
def set_partitions(n: int) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """All set partitions of ``range(n)``; blocks are sorted tuples, ordered by first element."""
    if n == 0:
        return ((),)
    out = []
    for part in set_partitions(n - 1):
        out.append(part + ((n - 1,),))
        for i in range(len(part)):
            out.append(part[:i] + (part[i] + (n - 1,),) + part[i + 1 :])
    return tuple(tuple(sorted(p)) for p in out)


# ----------------------------------------------------------------------------- diagrams


def block_cost(v: Vec) -> int:
    """Power-counting cost: a block's entries are O(n^{-cost/2}) in a wide random network."""
    return sum(v) - 1 - all(x % 2 == 0 for x in v)


def _support(v: Vec) -> frozenset[int]:
    return frozenset(j for j, x in enumerate(v) if x)


def is_connected(blocks: tuple[Vec, ...], m: int) -> bool:
    """Whether the blocks, as hyperedges on ``m`` slots, connect every slot."""
    reached, frontier = {0}, [0]
    while frontier:
        j = frontier.pop()
        for v in blocks:
            if v[j]:
                new = _support(v) - reached
                reached |= new
                frontier.extend(new)
    return len(reached) == m


def is_hypertree(blocks: tuple[Vec, ...]) -> bool:
    """Berge-acyclic after merging parallel two-slot blocks: the diagrams with an O(n)-rank
    factorisation (used by the factored term set)."""
    supports = Counter(_support(v) for v in blocks)
    if any(c > 1 and len(s) != 2 for s, c in supports.items()):
        return False
    edges = list(supports)
    if any(len(a & b) > 1 for a, b in itertools.combinations(edges, 2)):
        return False
    slots = frozenset().union(*edges) if edges else frozenset()
    return sum(len(e) - 1 for e in edges) == max(len(slots) - 1, 0)


def factored_keeps(k: int, alpha: Vec, blocks: tuple[Vec, ...]) -> bool:
    """Terms the factored k=3/4 evaluation can afford: hypertrees on the all-distinct top slice,
    and elsewhere no product involving the (factored-only) all-distinct top-degree block."""
    if alpha == (1,) * k:
        return is_hypertree(blocks)
    return len(blocks) == 1 or (1,) * k not in blocks


@cache
def _candidate_blocks(m: int, budget: int) -> tuple[Vec, ...]:
    """Blocks that may appear in a diagram on ``m`` slots: single-slot blocks of degree <= 2 are
    excluded (the reference Gaussian absorbs means and variances), and every block has cost >= 1,
    so a diagram within ``budget`` has total degree <= 2 * budget."""
    out = []
    for v in itertools.product(range(2 * budget + 1), repeat=m):
        if sum(v) == 0 or (len(_support(v)) == 1 and sum(v) <= 2):
            continue
        if block_cost(v) <= budget:
            out.append(v)
    return tuple(sorted(out, key=lambda v: (sum(v), v)))


def _multisets(items: tuple[Vec, ...], budget: int, start: int = 0):
    yield ()
    for i in range(start, len(items)):
        c = block_cost(items[i])
        if c <= budget:
            for rest in _multisets(items, budget - c, i):
                yield (items[i],) + rest


class Diagram(NamedTuple):
    coef: float  # 1 / (prod_v mult_v! * prod_v prod_j v_j!)
    blocks: tuple[Vec, ...]  # input cumulant blocks, each a vector over the output slots
    orders: Vec  # derivative order k_j on each slot: sum of the blocks


@cache
def diagrams(alpha: Vec, k: int, kind: str, degrees: frozenset[int], factored: bool = False) -> tuple[Diagram, ...]:
    """Every admitted diagram of the power-cumulant slice ``alpha`` (one term per diagram).

    Admitted: connected over the slots, total cost <= k-1 (simple) or <= k (augment), and every
    block of a degree in ``degrees`` (the degrees tracked in the incoming pre-activations).
    ``factored`` applies the factored term set (differs from unfactored only for augment).
    """
    m = len(alpha)
    budget = k - 1 + (check_kind(kind) == "augment")
    out = []
    for blocks in _multisets(_candidate_blocks(m, budget), budget):
        if not blocks and m > 1:
            continue
        if not is_connected(blocks, m) or any(sum(v) not in degrees for v in blocks):
            continue
        if factored and kind == "augment" and k in (3, 4) and not factored_keeps(k, alpha, blocks):
            continue
        denom = math.prod(math.factorial(c) for c in Counter(blocks).values())
        denom *= math.prod(math.factorial(x) for v in blocks for x in v)
        orders = tuple(sum(v[j] for v in blocks) for j in range(m))
        out.append(Diagram(1.0 / denom, blocks, orders))
    return tuple(out)


# ----------------------------------------------------------------------------- power cumulants -> cumulants


@cache
def cumulant_from_power_cumulants(alpha: Vec) -> tuple[tuple[float, tuple[Vec, ...]], ...]:
    """Express the cumulant slice ``alpha`` through joint cumulants of powers.

    Returns ``(coef, pieces)`` pairs with ``K_alpha = sum coef * prod_pieces pK_piece``, where a
    piece is a vector over the slots of ``alpha`` and ``pK_piece = cum(X_j^{piece_j} : piece_j > 0)``.
    Derivation: write the cumulant through moments (Moebius over set partitions of the copies),
    expand each moment of powers through power cumulants, and collect: a set partition ``rho`` of
    the copies contributes ``sum_tau mu(tau)`` over groupings ``tau`` of its pieces in which no
    group holds two pieces on the same slot.
    """
    copies = [j for j, a in enumerate(alpha) for _ in range(a)]
    m = len(alpha)
    total: Counter = Counter()
    coef_cache: dict = {}
    for rho in set_partitions(len(copies)):
        pieces = tuple(sorted(tuple(sum(copies[p] == j for p in block) for j in range(m)) for block in rho))
        if pieces not in coef_cache:
            c = 0
            for tau in set_partitions(len(pieces)):
                if all(
                    len({j for i in group for j in _support(pieces[i])}) == sum(len(_support(pieces[i])) for i in group)
                    for group in tau
                ):
                    c += (-1) ** (len(tau) - 1) * math.factorial(len(tau) - 1)
            coef_cache[pieces] = c
        total[pieces] += coef_cache[pieces]
    return tuple((float(c), p) for p, c in sorted(total.items()) if c)


# ----------------------------------------------------------------------------- radial (harmonic) tensors


@cache
def radial_slice_terms(
    pattern: Vec, r: int, full_metric: bool
) -> tuple[tuple[float, Vec, tuple[tuple[int, int], ...]], ...]:
    """Entries of ``T = Sym(A (x) M^{(x)r})`` at a slice pattern (all entries >= 1).

    ``T`` averages ``A[positions in S] * prod M[pairs]`` over the ``C(d, s) (2r-1)!!`` ways to pick
    the core's ``s`` positions ``S`` and pair the rest. Grouping by how many copies of each slot
    go to the core (``a``) and which slots the metric edges join gives ``(coef, a, edges)``
    with ``T_slice = sum coef * A[a-diagonal] * prod_{(j,l) in edges} M[i_j, i_l]``. Off-diagonal
    edges are skipped when the metric is diagonal.
    """
    d, m = sum(pattern), len(pattern)
    s = d - 2 * r
    norm = math.comb(d, s) * math.prod(range(2 * r - 1, 0, -2))
    pairs = [(j, l) for j in range(m) for l in range(j, m) if full_metric or j == l]
    out = []
    for a in itertools.product(*(range(x + 1) for x in pattern)):
        if sum(a) != s:
            continue
        deg = [x - y for x, y in zip(pattern, a)]
        for edges in itertools.combinations_with_replacement(pairs, r):
            got = [0] * m
            for j, l in edges:
                got[j] += 1
                got[l] += 1
            if got != deg:
                continue
            count = math.prod(math.comb(x, y) for x, y in zip(pattern, a))
            count *= math.prod(math.factorial(x) for x in deg)
            for (j, l), c in Counter(edges).items():
                count //= math.factorial(c) * (2**c if j == l else 1)
            out.append((count / norm, tuple(a), edges))
    return tuple(out)


@cache
def radial_core_coefs(n: int, d: int, r: int) -> tuple[float, ...]:
    """Coefficients ``c_j`` (``j = r..d//2``) with ``core = sum_j c_j R^{j-r} tr^j T`` giving
    ``R^r core = P_{>=r} T``: the components of radial index >= r of a symmetric degree-d tensor.

    ``R`` is ``Sym(. (x) I)`` (multiplication by |x|^2) and ``tr`` contracts two legs. On the
    component ``|x|^{2q} h_{d-2q}`` (``h`` harmonic) the Laplacian ``L = d(d-1) tr`` acts as
    ``2q (2q + 2(d-2q) + n - 2)``, so ``L^j`` is diagonal in the components and the coefficients
    solve a triangular system making every component ``q >= r`` come out with weight one.
    """

    def lap(q: int, s: int) -> int:  # L on |x|^{2q} h_s
        return 2 * q * (2 * q + 2 * s + n - 2)

    def lap_power(q: int, j: int) -> int:  # L^j on the component q of a degree-d tensor
        s = d - 2 * q
        return math.prod(lap(q - i, s) for i in range(j))

    top = d // 2
    c: dict[int, Fraction] = {}
    for q in range(r, top + 1):
        rest = sum(c[j] * lap_power(q, j) for j in range(r, q))
        c[q] = (1 - rest) / lap_power(q, q)
    # L^j = (d)_{2j} tr^j, where (d)_{2j} is the falling factorial.
    return tuple(float(c[j] * math.perm(d, 2 * j)) for j in range(r, top + 1))


def perfect_matchings(items: tuple[int, ...]):
    """All ways to pair up ``items`` (an even-length tuple)."""
    if not items:
        yield ()
        return
    first, rest = items[0], items[1:]
    for i in range(len(rest)):
        for m in perfect_matchings(rest[:i] + rest[i + 1 :]):
            yield ((first, rest[i]),) + m
