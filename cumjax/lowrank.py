"""Low-rank symmetric tensors and lazily contracted tensor-network sums for the factored k=3/4
estimator (ARC, arXiv 2605.05179, "factored" variant).

* :class:`FactoredTensor` stores a symmetric degree-d tensor as ``Sym(sum_r (x)_p parts[p][..., r])``:
  k = 3 uses three ``(n, R)`` parts (CP form), k = 4 two ``(n, R)`` vectors and one symmetric
  ``(n, n)`` matrix per rank, stored rank-major as ``(R, n, n)`` (every term the k = 4 step creates
  has a rank-one pair of legs, so only one part is ``n^2 R``). Memory O(n R) / O(n^2 R) instead of
  O(n^d).
* :class:`Net` is a sum of tensor networks over ``m`` slot indices: the top-degree slices of the
  nonlinear step are built as networks (products of block slices and per-neuron vectors) and only
  ever contracted to at most ``m - 1`` free indices or converted to factored form, never
  materialised as ``(n,)*m`` arrays.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import math
import string
from collections import Counter
from collections.abc import Sequence
from functools import cache

import jax
import jax.numpy as jnp

from . import products
from ._fusion import materialize

Array = jax.Array
_LETTERS = string.ascii_letters
_RANK = 1 << 20  # labels >= this are rank indices of factored tensors (slot labels are small ints)
_fresh = itertools.count(100)  # internal labels of networks (fresh per network built)
_fresh_rank = itertools.count(_RANK + 1)


def _rank_axis(p) -> int:
    """The rank axis of a part: last for ``(n, R)`` vectors, first for the ``(R, n, n)`` matrices
    (rank-major, so a rank block is a contiguous run of n x n matrices: the linear map, block
    concatenation and re-factoring move whole matrices, never a strided rank column)."""
    return 0 if p.ndim == 3 else p.ndim - 1


def _rank_major(a, lab) -> bool:
    """Whether a labelled factor is a rank-major (R, n, n) part: symmetric in its two legs."""
    return a.ndim == 3 and lab[0] >= _RANK


def _part_labels(p, legs: tuple, rank) -> tuple:
    """The labels of part ``p``'s axes: its legs' and ``rank`` on its rank axis."""
    return (rank,) + tuple(legs) if _rank_axis(p) == 0 else tuple(legs) + (rank,)


_rank_mesh: contextvars.ContextVar = contextvars.ContextVar("rank_mesh", default=None)


@contextlib.contextmanager
def rank_sharding(mesh: jax.sharding.Mesh | None):
    """Trace the factored algebra with its rank axis split over all devices of ``mesh``: every
    contraction summing over a rank index runs on each device's share of the ranks and is summed
    over devices (``psum``), and the per-rank linear maps run on the shares in place. Static:
    decided while tracing (``PropagationConfig.mesh`` sets it for one propagation)."""
    token = _rank_mesh.set(mesh)
    try:
        yield
    finally:
        _rank_mesh.reset(token)


def _sharded(f, factors, rank: int | None, out_rank_axis: int | None):
    """``f(*arrays)`` with the axis labelled ``rank`` of every factor split over the active rank
    mesh; the result is psum'd over devices (``out_rank_axis`` None) or stays split on that axis."""
    mesh = _rank_mesh.get()
    arrays = [a for a, _ in factors]
    if mesh is None or rank is None:
        return f(*arrays)
    P, axes = jax.sharding.PartitionSpec, mesh.axis_names
    specs = tuple(P(*(axes if l == rank else None for l in lab)) for _, lab in factors)
    if out_rank_axis is None:
        local, out = (lambda *a: jax.lax.psum(f(*a), axes)), P()
    else:
        local, out = f, P(*([None] * out_rank_axis + [axes]))
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out, check_vma=False)(*arrays)


def _rank_chunk(R: int, n: int) -> int:
    """Rank block summed per loop step: the largest divisor of R up to n (n itself when R is a
    multiple of the width, as unsharded ranks are), or all of R when R <= n. Bounds every
    rank-sized temporary of a contraction at n^2 x block, whatever XLA schedules."""
    return R if R <= n else max(c for c in range(1, n + 1) if R % c == 0)


def contract(
    factors: Sequence[tuple[Array, tuple[int, ...]]], out: Sequence[int], n: int, dtype, memo: dict | None = None
) -> Array:
    """``einsum`` of ``(array, labels)`` factors onto the labels ``out`` (summing the others);
    output labels no factor carries are broadcast. Returns an ``(n,)*len(out)`` array.
    memo: a dict shared by the contractions of one step: one that equals an earlier one up to
    renaming its labels and transposing its output is read back (e.g. the diagonals of a factored
    network in a trace are transposed slices of the same tensor)."""
    out = tuple(out)
    return products.evaluate([(1.0, contract_pieces(factors, out, n, memo))], len(out), n, dtype, labels=out)


def contract_pieces(
    factors: Sequence[tuple[Array, tuple[int, ...]]], out: Sequence[int], n: int, memo: dict | None = None
) -> list:
    """The contraction of :func:`contract` as :mod:`cumjax.products` pieces ``(array, labels)``:
    the factors joined by summed labels contracted into one piece, the others (no summed label)
    left as they are, to be multiplied in with the other terms of a sum."""
    factors = [take_diagonals(a, tuple(lab)) for a, lab in factors]
    out = tuple(out)
    summed = {l for _, lab in factors for l in lab if l not in out}
    if not summed:
        return factors
    joined = [(a, lab) for a, lab in factors if set(lab) & summed]
    rest = [(a, lab) for a, lab in factors if not set(lab) & summed]
    # factors on free labels only that share no summed label stay outside the einsum: inside it
    # they would scale (and copy) the large rank-carrying factors first
    present = {l for _, lab in joined for l in lab}
    kept = tuple(l for l in out if l in present)
    if memo is None:
        core = _einsum(joined, kept, n)
    else:
        key, perm = _canonical(joined, kept)
        if key not in memo:  # stored with its output in canonical order (and its arrays, so ids stay unique)
            memo[key] = (jnp.transpose(_einsum(joined, kept, n), perm), [a for a, _ in joined])
        core = memo[key][0]
        kept = tuple(kept[p] for p in perm)
    return [(core, kept)] + rest


def _einsum(factors, kept, n: int) -> Array:
    return _summed_over_rank_blocks([take_diagonals(a, lab) for a, lab in factors], tuple(kept), n)


def _subscripts(factors, out) -> str:
    """The einsum string of labelled factors summed onto the labels ``out``."""
    letter: dict[int, str] = {}
    name = lambda l: letter.setdefault(l, _LETTERS[len(letter)])  # noqa: E731
    subs = ",".join("".join(name(l) for l in lab) for _, lab in factors)
    return subs + "->" + "".join(name(l) for l in out)


def _canonical(factors, kept) -> tuple[tuple, tuple[int, ...]]:
    """A key equal for contractions equal up to renaming summed labels, the order of the factors
    and a permutation of the output, and that permutation (canonical output axis i is ``kept[perm[i]]``).
    (R, n, n) factors are symmetric in their two legs (every FactoredTensor part is)."""
    best = None
    for perm in itertools.permutations(range(len(kept))):
        pos = {kept[p]: i for i, p in enumerate(perm)}
        order = sorted(factors, key=lambda f: (id(f[0]), tuple(pos.get(l, -1) for l in f[1])))
        summed: dict[int, int] = {}
        key = []
        for a, lab in order:
            mapped = [pos[l] if l in pos else summed.setdefault(l, 100 + len(summed)) for l in lab]
            if _rank_major(a, lab):
                mapped[1:] = sorted(mapped[1:])
            key.append((id(a), tuple(mapped)))
        key = (len(kept), tuple(key))
        if best is None or key < best[0]:
            best = (key, perm)
    return best


@dataclasses.dataclass(frozen=True)
class RankGemm:
    """Plan of ``sum_r prod_f F_f[..., r]`` as matrix products over the rank ``r``.

    premerge: ``(factor indices, labels)``: factors sharing a summed non-rank label, contracted
    first into one factor with those labels (a vector or matrix times the rank factors: one pass).
    left, right: indices (after premerge) of the factors whose broadcast product forms each GEMM
    operand ``(prod of free dims, ranks)``; their free labels are disjoint, so the sum over r is
    one ``(P, r) @ (r, Q)`` product. blocked: a side multiplies several factors into an
    ``n^2 x ranks`` (or larger) operand, so ranks go in blocks of n under a loop (bounded temporary);
    otherwise one GEMM over all ranks.
    """

    premerge: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]
    left: tuple[int, ...]
    right: tuple[int, ...]
    left_labels: tuple[int, ...]
    right_labels: tuple[int, ...]
    blocked: bool


def rank_gemm_plan(labels: Sequence[tuple[int, ...]], kept: tuple[int, ...], r: int) -> RankGemm | None:
    """The :class:`RankGemm` plan of contracting factors with ``labels`` onto ``kept`` by summing the
    rank label ``r`` (and any other summed labels); None when it does not apply (a factor without
    r, or no split into two sides with disjoint free labels), then einsum does the contraction."""
    items = [((i,), tuple(lab)) for i, lab in enumerate(labels)]
    premerge = []
    for l in sorted({l for lab in labels for l in lab if l not in kept and l != r}):
        carrying = [it for it in items if l in it[1]]
        rest = [it for it in items if l not in it[1]]
        needed = set(kept) | {r} | {x for _, lab in rest for x in lab}
        merged = tuple(dict.fromkeys(x for _, lab in carrying for x in lab if x != l and x in needed))
        if len([x for x in merged if x != r]) > max(len([x for x in lab if x != r]) for _, lab in carrying):
            return None  # the merge would make a larger array than it reads
        idx = tuple(i for ids, _ in carrying for i in ids)
        premerge.append((idx, merged))
        items = rest + [(idx, merged)]
    if len(items) < 2 or any(r not in lab for _, lab in items):
        return None
    free = [frozenset(lab) - {r} for _, lab in items]
    best = None
    for mask in range(1, 1 << (len(items) - 1)):  # item 0 always on the right: each split once
        left = tuple(i for i in range(len(items)) if mask >> i & 1)
        right = tuple(i for i in range(len(items)) if not mask >> i & 1)
        lf, rf = frozenset().union(*(free[i] for i in left)), frozenset().union(*(free[i] for i in right))
        if lf & rf:
            continue
        temps = [len(f) for side, f in ((left, lf), (right, rf)) if len(side) > 1]
        score = (max(temps, default=-1), sum(temps), -len(right))
        if best is None or score < best[0]:
            best = (score, left, right, lf, rf)
    if best is None:
        return None
    score, left, right, lf, rf = best

    # Operand order and axis orders: the GEMM's (P, Q) output is transposed to ``kept``; one that
    # keeps the minor axis in place is a cheap copy of rows, one that moves it is a strided gather
    # (several times slower on CPU, and fused into every consumer). A side of several factors
    # takes any order; a lone (R, n, n) factor either order of its two legs (symmetric, as
    # :func:`_canonical` assumes).
    def orders(side, f):
        lab = items[side[0]][1]
        if len(side) > 1:
            return [tuple(l for l in kept if l in f)]
        own = tuple(l for l in lab if l != r)
        sym = len(own) == 2 and lab[0] == r and len(items[side[0]][0]) == 1  # as in _canonical
        return [own, own[::-1]] if sym else [own]

    def cost(got):
        return 0 if got == tuple(kept) else 1 if got[-1:] == tuple(kept)[-1:] else 2

    options = [
        (cost(a + b), first, second, a, b)
        for first, second, ff, sf in ((left, right, lf, rf), (right, left, rf, lf))
        for a in orders(first, ff)
        for b in orders(second, sf)
    ]
    _, first, second, a, b = min(options, key=lambda o: o[0])
    return RankGemm(tuple(premerge), first, second, a, b, blocked=score[0] >= 2)


def _run_rank_gemm(plan: RankGemm, arrays: Sequence[Array], labels, kept, r: int, n: int) -> Array:
    """Evaluate :func:`rank_gemm_plan` on ``arrays`` (the labelled factors); ``(dims of kept)``."""
    items = [((i,), (a, tuple(lab))) for i, (a, lab) in enumerate(zip(arrays, labels))]
    for idx, merged in plan.premerge:  # in the order (and item order) rank_gemm_plan made them
        carrying = [_summed_leg_minor(f, merged) if len(ids) == 1 else f for ids, f in items if set(ids) <= set(idx)]
        carrying.sort(key=lambda f: -f[0].size)  # the big factor as the product's left operand
        items = [it for it in items if not set(it[0]) <= set(idx)] + [(idx, (_plain_einsum(carrying, merged), merged))]
    factors = [f for _, f in items]
    dims = {l: a.shape[lab.index(l)] for a, lab in factors for l in lab}

    def operand(side, out, block):
        """The side's ``(P, ranks)`` operand, or ``(ranks, P)`` when it holds a rank-major factor
        (built in that factor's layout); and the axis of its ranks."""
        fs = [factors[i] for i in side]
        if block is not None:
            fs = [(jax.lax.dynamic_slice_in_dim(a, *block, lab.index(r)), lab) for a, lab in fs]
        major = any(_rank_major(a, lab) for a, lab in fs)
        if len(fs) == 1 and major and fs[0][1] == (r, out[1], out[0]):
            x = fs[0][0]  # symmetric in its two legs: the other order is the same array
        else:
            x = _plain_einsum(fs, (r,) + out if major else out + (r,))
        P = math.prod(dims[l] for l in out)
        return (jnp.reshape(x, (x.shape[0], P)), 0) if major else (jnp.reshape(x, (P, x.shape[-1])), 1)

    def gemm(block=None):
        (a, ra), (b, rb) = operand(plan.left, plan.left_labels, block), operand(plan.right, plan.right_labels, block)
        return jax.lax.dot_general(a, b, (((ra,), (rb,)), ((), ())))

    R = dims[r]
    out = _sum_over_rank_blocks(gemm, R, _rank_chunk(R, n) if plan.blocked else R)
    got = plan.left_labels + plan.right_labels
    out = jnp.reshape(out, tuple(dims[l] for l in got))
    return jnp.transpose(out, tuple(got.index(l) for l in kept))


def _summed_leg_minor(factor, out):
    """A rank-major (R, n, n) factor (symmetric in its legs) labelled so that a leg summed away
    (not in ``out``) is its minor axis: summing it is then a matrix product of the factor as it
    lies (as the left operand), where the middle axis would make XLA transpose the whole factor."""
    a, lab = factor
    if _rank_major(a, lab) and lab[1] not in out and lab[2] in out:
        return a, (lab[0], lab[2], lab[1])
    return factor


def _sum_over_rank_blocks(term, R: int, c: int) -> Array:
    """``sum_i term((i c, c))`` over the ``R // c`` blocks of c ranks under a loop, or
    ``term(None)`` (all ranks at once) when ``c == R``."""
    if c == R:
        return term(None)
    return jax.lax.fori_loop(1, R // c, lambda i, acc: acc + term((i * c, c)), term((0, c)))


def _plain_einsum(factors, out) -> Array:
    return jnp.einsum(_subscripts(factors, out), *[a for a, _ in factors], optimize="auto")


def _summed_over_rank_blocks(factors, kept: tuple[int, ...], n: int) -> Array:
    """The labelled factors contracted onto ``kept``, summing their largest rank index: as one
    or a loop of matrix products (:func:`rank_gemm_plan`) where the factors split into two sides,
    else by einsum, looping over blocks of the rank where (R, n, n) factors are involved (split
    over the devices of the active rank mesh, if any)."""
    expr = _subscripts(factors, kept)
    sizes = {l: a.shape[lab.index(l)] for a, lab in factors for l in lab if l >= _RANK}
    r = max(sizes, key=sizes.get) if sizes else None
    labels = [lab for _, lab in factors]
    plan = None if r is None else rank_gemm_plan(labels, tuple(kept), r)
    # Without a plan: only (R, n, n) factors (k = 4) make n^2 R temporaries worth bounding; with
    # (n, R) factors alone (k = 3) one einsum over the whole rank takes the cheaper contraction order.
    blocked = any(a.ndim >= 3 for a, lab in factors if any(l >= _RANK for l in lab))
    # ... and where every other label is kept (e.g. sum_r a_ir b_jr B_rij) no GEMM exists and
    # einsum's batched product would transpose the rank-major factor to put r minor: summed rank
    # by rank instead, reading each n x n matrix where it lies
    by_rank = plan is None and blocked and all(set(lab) <= set(kept) | {r} for lab in labels)

    def summed(*arrays):
        if plan is not None:
            return _run_rank_gemm(plan, arrays, labels, tuple(kept), r, n)
        if by_rank:
            return _rank_by_rank(arrays, labels, tuple(kept), r)
        if r is None or not blocked:
            return jnp.einsum(expr, *arrays, optimize="auto")
        axes = [lab.index(r) if r in lab else None for lab in labels]
        R = next(a.shape[ax] for a, ax in zip(arrays, axes) if ax is not None)

        def block(b=None):
            parts = [
                a if ax is None or b is None else jax.lax.dynamic_slice_in_dim(a, *b, ax) for a, ax in zip(arrays, axes)
            ]
            return jnp.einsum(expr, *parts, optimize="auto")

        return _sum_over_rank_blocks(block, R, _rank_chunk(R, n))

    return _sharded(summed, factors, r, None)


def _rank_by_rank(arrays, labels, kept: tuple[int, ...], r: int, unroll: int = 8) -> Array:
    """``sum_r prod_f F_f[..r..]`` for factors whose labels other than ``r`` are all in ``kept``: a
    loop accumulating one elementwise product per rank (``unroll`` ranks per step)."""
    dims = {l: a.shape[lab.index(l)] for a, lab in zip(arrays, labels) for l in lab}
    R = dims[r]
    u = max(c for c in range(1, unroll + 1) if R % c == 0)

    def at(a, lab, i):  # the factor at rank i, its axes placed on kept
        x = jax.lax.dynamic_index_in_dim(a, i, lab.index(r), keepdims=False)
        own = [l for l in lab if l != r]
        x = jnp.transpose(x, sorted(range(len(own)), key=lambda t: kept.index(own[t])))
        return jnp.reshape(x, [dims[l] if l in own else 1 for l in kept])

    def step(s, acc):
        for i in range(u):
            acc = acc + math.prod(at(a, lab, s * u + i) for a, lab in zip(arrays, labels))
        return acc

    dtype = jnp.result_type(*arrays)
    return jax.lax.fori_loop(0, R // u, step, jnp.zeros(tuple(dims[l] for l in kept), dtype))


def take_diagonals(a: Array, labels: tuple[int, ...]) -> tuple[Array, tuple[int, ...]]:
    """Resolve repeated labels of one operand by strided slicing of the flattened pair of axes
    (much cheaper on CPU than einsum's generic repeated-index handling). The pair is moved to
    the front, or to the back unless it leads already: no transpose of a rank-major (R, n, n)
    factor read on its diagonal."""
    while len(set(labels)) < len(labels):
        i = next(t for t in range(len(labels)) if labels[t] in labels[:t])
        j = labels.index(labels[i])
        n = a.shape[j]
        rest = tuple(l for t, l in enumerate(labels) if t not in (i, j))
        if (j, i) == (0, 1):
            a = jnp.reshape(a, (n * n,) + a.shape[2:])[:: n + 1]
            labels = (labels[j],) + rest
        else:
            a = jnp.moveaxis(a, (j, i), (-2, -1))
            a = jnp.reshape(a, a.shape[:-2] + (n * n,))[..., :: n + 1]
            labels = rest + (labels[j],)
    return a, labels


def _map_rank_blocks(f, p: Array, n: int) -> Array:
    """``f`` applied to blocks of the rank axis of ``p``, written into one output (each
    device's share of the ranks in place under an active rank mesh)."""

    def mapped(p):
        ax = _rank_axis(p)
        R = p.shape[ax]
        c = _rank_chunk(R, n)
        if c == R:
            return f(p)

        def step(src):  # block i of src mapped into block i of out
            return lambda i, out: jax.lax.dynamic_update_slice_in_dim(
                out, f(jax.lax.dynamic_slice_in_dim(out if src is None else src, i * c, c, ax)), i * c, ax
            )

        shape = p.shape[:ax] + (c,) + p.shape[ax + 1 :]
        block = jax.eval_shape(f, jax.ShapeDtypeStruct(shape, p.dtype))
        if block.shape == shape and block.dtype == p.dtype:
            # each block is read before it is overwritten, so XLA can map p in place when p is
            # dead afterwards (the pre-linear top is): no second n^2 R buffer
            return jax.lax.fori_loop(0, R // c, step(None), p)
        out = jnp.zeros(block.shape[:ax] + (R,) + block.shape[ax + 1 :], block.dtype)
        return jax.lax.fori_loop(0, R // c, step(p), out)

    return _on_rank_shards(mapped, p)


def _concat_ranks(arrays: Sequence[Array]) -> Array:
    """Parts concatenated along their rank axis, written as in-place updates of one buffer: XLA
    fuses each operand's producer (a leg scaling, say) into its update, where a concatenate would
    first materialise every operand (one more n^2 R copy of the inherited top at k = 4)."""
    ax = _rank_axis(arrays[0])
    shape = list(arrays[0].shape)
    shape[ax] = sum(a.shape[ax] for a in arrays)
    out = jnp.zeros(shape, arrays[0].dtype)
    start = 0
    for a in arrays:
        out = jax.lax.dynamic_update_slice_in_dim(out, a, start, ax)
        start += a.shape[ax]
    return out


def _rank_range(p: Array, start: int, stop: int | None) -> Array:
    """Ranks ``start:stop`` of a part."""
    return p[start:stop] if _rank_axis(p) == 0 else p[..., start:stop]


def _congruence(B: Array, W: Array) -> Array:
    """``W^T B_r W`` for symmetric ``B (R, n, n)``: ``C_r = B_r W`` is one matrix product over the
    given ranks; ``C_r^T W`` is the result transposed, and symmetric, so it is written in the
    layout the contraction produces (rank, C's free axis, W's), with no transpose."""
    R, n, _ = B.shape
    C = jnp.reshape(jnp.reshape(B, (R * n, n)) @ W, (R, n, W.shape[1]))
    return jnp.einsum("rad,ac->rdc", C, W)


def _on_rank_shards(f, p: Array) -> Array:
    """``f(p)`` for an ``f`` acting rank by rank on the rank axis: on each device's share of the
    ranks in place under an active rank mesh."""
    return _sharded(f, [(p, _part_labels(p, (0,) * (p.ndim - 1), _RANK))], _RANK, _rank_axis(p))


def _tie(labels: tuple, owner: tuple[int, ...]) -> tuple:
    """``labels`` (one tuple per leg group) with the tuples of the groups of one part (a part
    raised to a power, see :class:`FactoredTensor`) sorted: those groups are interchangeable."""
    out = list(labels)
    for q in set(owner):
        idx = [o for o, p in enumerate(owner) if p == q]
        for o, lab in zip(idx, sorted(labels[o] for o in idx)):
            out[o] = lab
    return tuple(out)


@cache
def _assignments(
    legs: tuple[int, ...], pattern: tuple[int, ...], owner: tuple[int, ...] | None = None
) -> tuple[tuple[float, tuple[tuple[int, ...], ...]], ...]:
    """Entries of ``Sym(parts)`` at slot pattern ``pattern``: ``(weight, slot labels per part)``
    averaged over the ``d!`` ways to put the legs on the positions; a part's labels are sorted
    (parts are symmetric in their own legs), so equal assignments merge. owner: the stored part
    each entry of ``legs`` reads (equal owners: a power of one part, whose groups are interchangeable)."""
    positions = [j for j, c in enumerate(pattern) for _ in range(c)]
    d = len(positions)
    owner = tuple(range(len(legs))) if owner is None else owner
    offsets = [sum(legs[:p]) for p in range(len(legs))]
    counts = Counter()
    for perm in itertools.permutations(range(d)):
        labels = tuple(tuple(sorted(positions[perm[o + t]] for t in range(l))) for o, l in zip(offsets, legs))
        counts[_tie(labels, owner)] += 1
    total = math.factorial(d)
    return tuple((c / total, labels) for labels, c in sorted(counts.items()))


@cache
def _assignment_classes(legs: tuple[int, ...], pattern: tuple[int, ...], owner: tuple[int, ...] | None = None):
    """``_assignments`` up to the permutations of equal-count slots (the slice is symmetric under
    them): ``(perms, ((weight * class size, representative labels), ...))``; the slice is the
    average over ``perms`` of the transposed sum of representatives (n^m work per permutation
    instead of n^m R per assignment)."""
    m = len(pattern)
    owner = tuple(range(len(legs))) if owner is None else owner
    perms = [p for p in itertools.permutations(range(m)) if all(pattern[p[s]] == pattern[s] for s in range(m))]
    classes: dict = {}
    for w, labels in _assignments(legs, pattern, owner):
        key = min(_tie(tuple(tuple(sorted(p[l] for l in lab)) for lab in labels), owner) for p in perms)
        classes.setdefault(key, [w, labels, 0])[2] += 1
    return perms, tuple((w * c, labels) for w, labels, c in classes.values())


@jax.tree_util.register_pytree_node_class
class FactoredTensor:
    """Symmetric degree-d tensor ``Sym(sum_r (x)_p parts[p][..., r] ^ powers[p])``.

    parts: arrays of shape ``(n,)*legs[p] + (R,)``, each symmetric in its leading legs, and each
    used ``powers[p]`` times in the outer product (default once); the degree is
    ``sum(legs * powers)``. k = 3: legs (1, 1, 1), or (1, 1) with powers (2, 1) where every rank
    term has two equal legs (the simple term set: ``E_r (x) E_r (x) s_r e_r`` leaf groups and
    ``e_r (x) e_r (x) c_r`` re-factored slices), which saves a third of the linear map and of the
    slice products; k = 4: legs (1, 1, 2).
    blocks: static sizes of consecutive rank blocks summing to R, oldest first (the propagation
    appends one per hidden layer; :meth:`split_blocks` separates the oldest). Default: one block.
    diag: static ``(part, offset)`` of the one-leg parts whose ranks ``offset .. offset + n`` hold
    a diagonal matrix (the ``e_i`` legs of the rank-n blocks a nonlinear step creates, possibly
    scaled): the next linear map scales the columns of ``W^T`` there instead of a matrix product,
    and a slice of a tensor made of such chunks contracts each of them without a rank sum.
    """

    def __init__(
        self,
        parts: Sequence[Array],
        legs: tuple[int, ...],
        n: int,
        blocks: tuple[int, ...] | None = None,
        diag: tuple[tuple[int, int], ...] = (),
        powers: tuple[int, ...] | None = None,
    ):
        self.parts, self.legs, self.n = tuple(parts), tuple(legs), n
        self.blocks = (self.rank,) if blocks is None else tuple(blocks)
        self.diag = tuple(diag)
        self.powers = (1,) * len(self.parts) if powers is None else tuple(powers)

    def tree_flatten(self):
        return self.parts, (self.legs, self.n, self.blocks, self.diag, self.powers)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children, *aux)

    @property
    def degree(self) -> int:
        return sum(l * c for l, c in zip(self.legs, self.powers))

    @property
    def rank(self) -> int:
        return self.parts[0].shape[_rank_axis(self.parts[0])]

    @property
    def owner(self) -> tuple[int, ...]:
        """The part each factor of the outer product reads (a part with power c: c times)."""
        return tuple(p for p, c in enumerate(self.powers) for _ in range(c))

    def __repr__(self):
        return (
            f"FactoredTensor(degree={self.degree}, n={self.n}, rank={self.rank}, legs={self.legs}, "
            f"powers={self.powers}, blocks={self.blocks})"
        )

    def _with(self, parts, blocks=None, diag=None) -> FactoredTensor:
        return FactoredTensor(
            parts,
            self.legs,
            self.n,
            self.blocks if blocks is None else blocks,
            self.diag if diag is None else diag,
            self.powers,
        )

    def untied(self) -> FactoredTensor:
        """The same tensor with every power written out as separate (equal) parts."""
        if all(c == 1 for c in self.powers):
            return self
        owner = self.owner
        diag = tuple((o, off) for p, off in self.diag for o in range(len(owner)) if owner[o] == p)
        return FactoredTensor(
            [self.parts[p] for p in owner], tuple(self.legs[p] for p in owner), self.n, self.blocks, diag
        )

    def concat(self, other: FactoredTensor) -> FactoredTensor:
        if (self.legs, self.powers) != (other.legs, other.powers):
            return self.untied().concat(other.untied())
        return FactoredTensor(
            [_concat_ranks([a, b]) for a, b in zip(self.parts, other.parts)],
            self.legs,
            self.n,
            self.blocks + other.blocks,
            self.diag + tuple((p, o + self.rank) for p, o in other.diag),
            self.powers,
        )

    def merged_blocks(self, keep: int) -> FactoredTensor:
        """The same tensor with every rank block after the first ``keep`` merged into one."""
        return self._with(self.parts, blocks=self.blocks[:keep] + (sum(self.blocks[keep:]),))

    def split_blocks(self, num_old: int) -> tuple[FactoredTensor, FactoredTensor]:
        """``(oldest num_old blocks, the rest)``: two tensors that sum to this one (the first
        has rank 0 when num_old is 0)."""
        r = sum(self.blocks[:num_old])
        old, new = ([_rank_range(p, 0, r) for p in self.parts], [_rank_range(p, r, None) for p in self.parts])
        assert all(o + self.n <= r or o >= r for _, o in self.diag), "a diagonal chunk straddles the split"
        return (
            self._with(old, self.blocks[:num_old], tuple(e for e in self.diag if e[1] < r)),
            self._with(new, self.blocks[num_old:], tuple((p, o - r) for p, o in self.diag if o >= r)),
        )

    def linear(self, W: Array) -> FactoredTensor:
        """The cumulant of ``x @ W``: every leg contracted with W (O(n_in n_out R) per leg; a
        part used several times is mapped once)."""
        parts = []
        for i, (p, l) in enumerate(zip(self.parts, self.legs)):
            chunks = sorted(o for q, o in self.diag if q == i)
            if l == 1 and chunks and _rank_mesh.get() is None:
                parts.append(_linear_of_diagonal_chunks(W, p, chunks))
            elif l == 1:
                parts.append(_on_rank_shards(lambda b: W.T @ b, p))
            else:  # (R, n, n): W^T B_r W for every rank, one block of ranks at a time
                parts.append(_map_rank_blocks(lambda b: _congruence(b, W), p, self.n))
        return FactoredTensor(parts, self.legs, W.shape[1], self.blocks, powers=self.powers)

    def scale_legs(self, v: Array, coef=1.0) -> FactoredTensor:
        """``coef * T * (v (x) ... (x) v)`` (the same per-neuron factor on every leg; diagonal
        chunks stay diagonal)."""
        once = self.powers.index(1)  # coef goes into a part used once
        parts = []
        for i, (p, l) in enumerate(zip(self.parts, self.legs)):
            for t in range(l):
                p = p * jnp.reshape(v, _part_labels(p, [self.n if s == t else 1 for s in range(l)], 1))
            parts.append(p * coef if i == once else p)
        return self._with(parts)

    def _factors(self, labels) -> list:
        """``(array, slot labels and the rank label on the part's rank axis)`` of every factor of
        the outer product."""
        return [(self.parts[p], _part_labels(self.parts[p], lab, _RANK)) for p, lab in zip(self.owner, labels)]

    def slice(self, pattern: Sequence[int], memo: dict | None = None) -> Array:
        """Entries at distinct neurons repeated ``pattern`` times: ``(n,)*len(pattern)``
        (coincident entries hold the tensor's values there, not zeros). O(n^m R), or O(n^m R / n)
        when one part is diagonal chunks over all ranks. memo: see :func:`contract`."""
        m, dtype = len(pattern), self.parts[0].dtype
        perms, classes = _assignment_classes(tuple(self.legs[p] for p in self.owner), tuple(pattern), self.owner)
        q = self._diagonal_part()
        total = 0.0
        for w, labels in classes:
            if q is None:
                total = total + w * contract(self._factors(labels), range(m), self.n, dtype, memo)
                continue
            # sum_r d_r [s == r] f(r) = d_s f(s): one elementwise product per chunk of n ranks
            at = self.owner.index(q)
            s = labels[at][0]
            for o in range(0, self.rank, self.n):
                fs = [
                    (_rank_range(a, o, o + self.n), tuple(s if l == _RANK else l for l in lab))
                    for a, lab in self._factors(labels)
                ]
                fs[at] = (jnp.diagonal(fs[at][0]), (s,))
                total = total + w * contract(fs, range(m), self.n, dtype, memo)
        if len(perms) == 1:
            return total
        # a sum of transposed contraction outputs, read again through the permutations: computed
        # once into its own buffer, not recomputed per permutation with strided reads
        total = materialize(total)
        return sum(jnp.transpose(total, p) for p in perms) / len(perms)

    def _diagonal_part(self) -> int | None:
        """A one-leg part whose ranks are all diagonal chunks (a fresh leaf or re-factored block), if any."""
        for p in range(len(self.parts)):
            if {o for q, o in self.diag if q == p} == set(range(0, self.rank, self.n)) and self.rank:
                return p
        return None

    def dense(self) -> Array:
        """The full ``(n,)*d`` array (tests only: O(n^d R))."""
        return self.slice((1,) * self.degree)

    def net(self, slots: Sequence[int], m: int) -> Net:
        """The tensor on the distinct ``slots`` (one per leg) of an ``m``-slot network."""
        terms = []
        legs = tuple(self.legs[p] for p in self.owner)
        for w, labels in _assignments(legs, (1,) * self.degree, self.owner):
            r = next(_fresh_rank)
            terms.append(
                (
                    w,
                    tuple(
                        (a, tuple(r if s == _RANK else slots[s] for s in lab), False)
                        for a, lab in self._factors(labels)
                    ),
                )
            )
        return Net(m, terms)


class Net:
    """``sum_t coef_t * contraction of factors_t`` over ``m`` slot labels ``0..m-1``.

    A factor is ``(array, labels, symmetric)``; labels >= 100 are internal (summed). ``symmetric``
    marks arrays invariant under permuting their axes (labels are then kept sorted, so identical
    factors compare equal). Only ever contracted down to fewer free labels.
    """

    def __init__(self, m: int, terms=()):
        self.m, self.terms = m, list(terms)

    @staticmethod
    def leaf(m: int, array: Array, slots: tuple[int, ...], symmetric: bool = False) -> Net:
        labels = tuple(sorted(slots)) if symmetric else tuple(slots)
        return Net(m, [(1.0, ((array, labels, symmetric),))])

    def __add__(self, other: Net) -> Net:
        return Net(self.m, self.terms + other.terms)

    def __mul__(self, other) -> Net:
        if isinstance(other, Net):
            return Net(self.m, [(c1 * c2, f1 + f2) for c1, f1 in self.terms for c2, f2 in other.terms])
        return Net(self.m, [(c * other, f) for c, f in self.terms])

    __rmul__ = __mul__

    def relabel(self, mapping: dict[int, int], m: int | None = None) -> Net:
        """Slot label ``a`` becomes ``mapping.get(a, a)`` (two slots mapped together: a diagonal)."""

        def fix(f):
            a, lab, sym = f
            lab = tuple(mapping.get(l, l) for l in lab)
            return a, tuple(sorted(lab)) if sym else lab, sym

        return Net(self.m if m is None else m, [(c, tuple(fix(f) for f in fs)) for c, fs in self.terms])

    def merged(self, perms: Sequence[Sequence[int]]) -> Net:
        """One term per class of terms equal up to the slot permutations ``perms`` (a group),
        with summed coefficients: equal to this network after symmetrising over the group.
        Terms are compared by factor identity and labels (at most one internal label each)."""
        reps: dict = {}
        for c, fs in self.terms:
            internal = {l for _, lab, _ in fs for l in lab if l >= self.m}
            assert len(internal) <= 1, "terms with several internal labels are not merged"
            best = None
            for perm in perms:
                key = []
                for a, lab, sym in fs:
                    lab = tuple(perm[l] if l < self.m else -1 for l in lab)
                    key.append((id(a), tuple(sorted(lab)) if sym else lab))
                key = tuple(sorted(key))
                best = key if best is None or key < best else best
            if best in reps:
                reps[best][0] += c
            else:
                reps[best] = [c, fs]
        return Net(self.m, [(c, fs) for c, fs in reps.values()])

    def contract(self, out: Sequence[int], n: int, dtype, memo: dict | None = None) -> Array:
        return products.evaluate(self._pieces(out, n, memo), len(out), n, dtype, labels=tuple(out))

    def _pieces(self, out, n, memo, sign: float = 1.0) -> list:
        return [(sign * c, contract_pieces([(a, lab) for a, lab, _ in fs], out, n, memo)) for c, fs in self.terms]

    def masked_sum_last(self, n: int, dtype, perms=None, memo: dict | None = None) -> Array:
        """``out[i_0..i_{m-2}] = sum_{i_{m-1}} x[i]`` over ``i_{m-1}`` distinct from the free
        indices: the full sum minus the terms where the summed index equals a free one (valid
        where the free indices are distinct; the caller zeroes the rest). With ``perms`` (a
        group of permutations of the free slots) the result is only right after symmetrising
        over them, and equal terms are contracted once."""
        m = self.m
        out = tuple(range(m - 1))
        diagonals = Net(m)
        for a in range(m - 1):
            diagonals = diagonals + self.relabel({m - 1: a})
        full, diag = self, diagonals
        if perms is not None:  # the caller symmetrises over these permutations of free slots
            group = [tuple(p) + (m - 1,) for p in perms]
            full, diag = self.merged(group), diagonals.merged(group)
        terms = full._pieces(out, n, memo) + diag._pieces(out, n, memo, -1.0)
        return products.evaluate(terms, m - 1, n, dtype)


def refactor(slices: dict[tuple[int, ...], Array], k: int, n: int, dtype) -> FactoredTensor:
    """A rank-n :class:`FactoredTensor` equal to the given non-top slices (dense, zero where
    indices coincide) and zero on the all-distinct slice: one term per neuron i, ``e_i (x) e_i``
    on the first two legs times a row built from the slices that repeat i."""
    eye = jnp.eye(n, dtype=dtype)
    if k == 3:
        # Sym(e_i e_i c_i): entry (i,i,j) is c_i[j] / 3 and (i,i,i) is c_i[i].
        c = 3.0 * slices[(2, 1)].T + jnp.diag(slices[(3,)])
        return FactoredTensor((eye, c), (1, 1), n, diag=((0, 0),), powers=(2, 1))
    if k == 4:
        # Sym(e_i e_i B_i) with B_i symmetric: (i,i,j,l) -> B_i[j,l]/6, (i,i,j,j) -> (B_i[j,j]
        # + B_j[i,i])/6, (i,i,i,j) -> B_i[i,j]/2, (i,i,i,i) -> B_i[i,i].
        # The diagonal terms are scattered onto their n^2 entries, not broadcast over n^3.
        i = jnp.arange(n)
        B = 6.0 * slices[(2, 1, 1)]  # rank-major: B[r] = B_r
        B = B.at[:, i, i].add(3.0 * slices[(2, 2)])  # B[r, a, a] += 3 S22[r, a]
        B = B.at[i, i, :].add(2.0 * slices[(3, 1)])  # B[r, r, b] += 2 S31[r, b]
        B = B.at[i, :, i].add(2.0 * slices[(3, 1)])  # B[r, a, r] += 2 S31[r, a]
        B = B.at[i, i, i].add(slices[(4,)])
        return FactoredTensor((eye, B), (1, 2), n, diag=((0, 0),), powers=(2, 1))
    raise ValueError(f"factored tensors exist for k = 3, 4, not {k}")


def legs_for(k: int) -> tuple[int, ...]:
    return {3: (1, 1, 1), 4: (1, 1, 2)}[k]


def from_leaf_groups(groups: Sequence[tuple[Array, Array]], k: int, n: int, tied: bool = False) -> FactoredTensor:
    """Terms ``E[i, j] X[j, rest]`` (leaf slot i hanging off slot j, X dense over the other k-1
    slots) as rank-n factors, one block per group: ``E[:, r] (x) e_r (x) X[r]`` (k = 4: X[r]
    symmetrised, which Sym does anyway). tied (k = 3): the groups are ``(E, s)`` with
    ``X[r, j] = s[r] E[j, r]``, stored as ``E_r (x) E_r (x) s_r e_r`` (powers (2, 1))."""
    if tied:
        assert k == 3, "tied leaf groups exist for k = 3"
        parts = [(E, jnp.diag(s)) for E, s in groups]
        diag = tuple((1, g * n) for g in range(len(groups)))
        return FactoredTensor([_concat_ranks(ps) for ps in zip(*parts)], (1, 1), n, diag=diag, powers=(2, 1))
    eye = jnp.eye(n, dtype=groups[0][0].dtype)

    def rest(X):
        if k == 3:
            return X.T
        # rank-major: X[r] is the r-th matrix. Buffers for X (read twice, once transposed) and the
        # result (read by the slices through transposes and diagonals)
        X = materialize(X)
        return materialize(0.5 * (X + jnp.swapaxes(X, 1, 2)))

    parts = [(E, eye, rest(X)) for E, X in groups]
    diag = tuple((1, g * n) for g in range(len(groups)))
    return FactoredTensor([_concat_ranks(ps) for ps in zip(*parts)], legs_for(k), n, diag=diag)


def _linear_of_diagonal_chunks(W: Array, p: Array, chunks: Sequence[int]) -> Array:
    """``W^T @ p`` for an ``(n, R)`` part whose ranks ``o .. o + n`` (o in ``chunks``) hold a
    diagonal matrix D: ``W^T`` with its columns scaled by diag(D) there (n^2, not 2 n^3, FLOPs),
    matrix products only for the other ranks."""
    n, pieces, start = p.shape[0], [], 0
    for o in chunks:
        if o > start:
            pieces.append(W.T @ p[:, start:o])
        pieces.append(W.T.astype(p.dtype) * jnp.diagonal(p[:, o : o + n]))
        start = o + n
    if start < p.shape[1]:
        pieces.append(W.T @ p[:, start:])
    return _concat_ranks(pieces)
