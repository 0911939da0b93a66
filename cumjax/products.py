"""Sums of products of slot-indexed arrays, evaluated as a few stacked contractions.

The nonlinear step's slices are sums of many terms, each a product of *pieces*: arrays indexed by
some of the slice's ``m`` slots (block slices of the input cumulants, Gaussian expectations on one
slot, contracted sub-networks). Summed term by term, XLA fuses hundreds of broadcast products of
``(n,)*m`` arrays into one loop that reads its operands through strided transposes. Here the terms
are grouped by the slots their pieces cover (their *signature*); the terms of one signature are
stacked on a new axis ``t`` and summed by one ``dot_general`` contracting ``t`` (batched over the
slots the two pieces share): ``sum_t A_t[i, j] B_t[j, l]`` is one batched matrix product, not ``T``
passes over an ``n^3`` array.

:func:`plan` returns the grouping (inspectable: signatures, term counts, shapes, FLOPs) and
:func:`evaluate` runs it.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
Piece = tuple[Array, tuple[int, ...]]  # an array and the slot of each of its axes (distinct)
Term = tuple[float, Sequence[Piece]]
_LETTERS = string.ascii_lowercase
_MIN_STACK = 8  # fewer terms than this are summed as broadcast products, not contracted
# ... and fewer than this when the contraction's output would need its minor axis moved
_MIN_STACK_TRANSPOSED = 32


def _canonical(p: Piece) -> Piece:
    """The piece with its axes in increasing slot order."""
    a, lab = p
    target = tuple(sorted(lab))
    return (a if lab == target else jnp.transpose(a, [lab.index(s) for s in target])), target


def _times(p: Piece, q: Piece) -> Piece:
    """The elementwise product of two canonical pieces, on the union of their slots."""
    (a, la), (b, lb) = p, q
    out = tuple(sorted(set(la) | set(lb)))
    n = a.shape[0] if a.ndim else b.shape[0]

    def on(x, lab):
        return jnp.reshape(x, [n if s in lab else 1 for s in out])

    return on(a, la) * on(b, lb), out


def _merge(pieces: Sequence[Piece]) -> list[Piece]:
    """Multiply pieces together until no piece's slots lie within another's (a vector joins a
    matrix on its slot, a matrix joins a 3-slot array around it): what remains needs a
    contraction, not a product, to combine. Returns canonical pieces sorted by slots."""
    pieces = [_canonical((a, tuple(l))) for a, l in pieces]
    changed = True
    while changed:
        changed = False
        for i in range(len(pieces)):
            for j in range(len(pieces)):
                if i != j and set(pieces[i][1]) <= set(pieces[j][1]):
                    merged = _times(pieces[j], pieces[i])
                    pieces = [p for t, p in enumerate(pieces) if t not in (i, j)] + [merged]
                    changed = True
                    break
            if changed:
                break
    return sorted(pieces, key=lambda p: (len(p[1]), p[1]))


def _reduce_to_two(pieces: list[Piece]) -> list[Piece]:
    """Multiply the two smallest pieces until at most two remain (three singles become a pair and
    a single; a triangle of pairs becomes a 3-slot array and a pair)."""
    while len(pieces) > 2:
        a, b = pieces[0], pieces[1]
        pieces = _merge([_times(a, b)] + pieces[2:])
    return pieces


@dataclasses.dataclass(frozen=True)
class Group:
    """Terms whose (merged) pieces cover the same slots: ``signature`` holds one or two slot
    tuples, ``count`` terms, summed by one contraction of ``flops`` multiply-adds x 2."""

    signature: tuple[tuple[int, ...], ...]
    count: int
    flops: int


def _prepare(terms: Sequence[Term]) -> dict[tuple, list[tuple[float, list[Piece]]]]:
    groups: dict[tuple, list] = {}
    for coef, pieces in terms:
        if coef == 0:
            continue
        merged = _reduce_to_two(_merge(pieces)) if pieces else []
        sig = tuple(lab for _, lab in merged)
        groups.setdefault(sig, []).append((coef, merged))
    return groups


def plan(terms: Sequence[Term], n: int) -> list[Group]:
    """The grouping :func:`evaluate` uses (slot-level structure only; arrays are not read)."""
    out = []
    for sig, members in _prepare(terms).items():
        slots = set().union(*sig) if sig else set()
        contracted = 1 if len(sig) < 2 else len(members)
        out.append(Group(sig, len(members), 2 * contracted * n ** len(slots)))
    return out


def evaluate(terms: Sequence[Term], m: int, n: int, dtype, labels: tuple[int, ...] | None = None) -> Array:
    """``sum_t coef_t * prod(pieces_t)`` as an ``(n,)*m`` array (slots a term's pieces do not cover
    are broadcast). Pieces: ``(array, slots)``, one distinct slot per array axis; the output's axes
    are the slots ``labels`` (default ``range(m)``)."""
    if labels is not None and labels != tuple(range(m)):
        rename = {l: i for i, l in enumerate(labels)}
        terms = [(c, [(a, tuple(rename[l] for l in lab)) for a, lab in pieces]) for c, pieces in terms]
    total = jnp.zeros((n,) * m, dtype)
    for sig, members in _prepare(terms).items():
        if not sig:  # constants
            total = total + sum(c for c, _ in members)
            continue
        if len(sig) == 1:
            # a weighted sum of arrays with equal axis order: one contiguous pass (no stacking,
            # which would copy every n^3 array)
            part, labels = sum(c * p[0][0] for c, p in members), sig[0]
        elif len(members) < _min_stack(sig):
            # a few terms: broadcast products summed in the output's own layout; a dot_general
            # writes its output in (batch, free) order, which may need a strided transpose
            part, labels = _sum_products(members)
        else:
            part, labels = _contract_pairs(members, sig)
        total = total + _placed(part, labels, m, n)
    return total


def _min_stack(sig) -> int:
    """Fewest terms of signature ``sig`` worth a stacked contraction. Its output (see
    :func:`_contract_pairs`) comes in (shared slots, free slots of the first, of the second) order;
    unless that is already slot order, the transpose to it is fused into every consumer as strided
    reads of the whole array, slower than the broadcast products of a few terms (k4 simple
    factored, width 256, 4 layers: 3.4 -> 3.05 s with its 9-term groups summed)."""
    s1, s2 = sig
    shared = sorted(set(s1) & set(s2))
    order = shared + [s for s in s1 + s2 if s not in shared]
    return _MIN_STACK if order == sorted(order) else _MIN_STACK_TRANSPOSED


def _sum_products(members) -> tuple[Array, tuple[int, ...]]:
    parts = [_times(p[0], p[1]) for _, p in members]
    return sum(c * a for (c, _), (a, _) in zip(members, parts)), parts[0][1]


def _contract_pairs(members, sig) -> tuple[Array, tuple[int, ...]]:
    """``sum_t c_t A_t[S1] B_t[S2]`` by one dot_general contracting the term axis ``t``."""
    (s1, s2) = sig
    A = jnp.stack([c * p[0][0] for c, p in members])
    B = jnp.stack([p[1][0] for _, p in members])
    letter = {s: _LETTERS[i] for i, s in enumerate(sorted(set(s1) | set(s2)))}
    out = tuple(sorted(set(s1) | set(s2)))
    expr = (
        "z"
        + "".join(letter[s] for s in s1)
        + ",z"
        + "".join(letter[s] for s in s2)
        + "->"
        + "".join(letter[s] for s in out)
    )
    return jnp.einsum(expr, A, B), out


def _placed(x: Array, labels: tuple[int, ...], m: int, n: int) -> Array:
    """``x`` (axes ``labels``, sorted) broadcast onto ``m`` slot axes."""
    return jnp.reshape(x, [n if j in labels else 1 for j in range(m)])


def flops(groups: Sequence[Group]) -> int:
    return sum(g.flops for g in groups)
