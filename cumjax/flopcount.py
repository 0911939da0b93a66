"""FLOP counting for any JAX program: an analytic count from the operations its jaxpr executes,
and XLA's own count of the compiled program.

* :func:`jaxpr_flops` walks the jaxpr of a function and counts each primitive from its shapes:
  ``dot_general`` ``2 * batch * M * N * K`` (with ``K = 1``, an outer product, one multiply per
  output, counted as elementwise); floating elementwise ops (arithmetic, compares,
  selects) 1 per output element, ``integer_pow`` its multiplications; transcendentals (exp, log,
  erf, erfc, tanh, logistic, pow, sqrt, ...) 1 per element, in their own bucket; reducing ``k``
  numbers ``k - 1``; scatter-adds 1 per update; data movement, gathers, integer index arithmetic
  and operations on compile-time constants 0. It counts what XLA would execute: dead code is
  removed first, identical equations (same primitive, parameters, inputs) count once (CSE), and
  in loop bodies equations that depend only on loop-invariant values count once (hoisting).
  Control flow: calls (``jit``, ``closed_call``, ``custom_jvp_call``/``custom_vjp_call``,
  ``remat``) once; ``scan`` times its length; ``while`` times its trip count when it is a counted
  (fori-style) loop with bounds known at trace time, else ValueError; ``cond``/``switch`` the
  branch its index selects when known at trace time (``lax.platform_dependent``), else the most
  expensive one. A ``jax.grad``-transformed function is just another jaxpr: backward passes are
  counted the same way.
* :func:`compiled_cost` / :func:`compiled_flops` are XLA's cost analysis of the compiled program.
  XLA counts after fusion and simplification, counts integer index arithmetic, expands erfc
  (~60 FLOPs) and erf_inv (~37) into polynomials, and counts a ``while``/``scan`` body once.
  :mod:`cumjax.flops` puts both side by side for the estimators and the sampler.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re

import jax
import jax.extend  # noqa: F401  (jax.extend.core: jaxpr types)
import jax.numpy as jnp
import numpy as np

try:  # XLA removes dead code; so do we (private API, stable across recent jax releases)
    from jax._src.interpreters.partial_eval import dce_jaxpr as _dce_jaxpr
except ImportError:  # pragma: no cover
    _dce_jaxpr = None

ClosedJaxpr = jax.extend.core.ClosedJaxpr
Jaxpr = jax.extend.core.Jaxpr
Literal = jax.extend.core.Literal


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """FLOPs of a program by kind (exact integers from shapes).

    matmul: ``dot_general`` (and convolutions) at 2 per multiply-add. elementwise: floating
    arithmetic, comparisons, selects, reductions, scatter-adds and outer products.
    transcendental: one per element of exp, log, erf, tanh, logistic, pow, sqrt and the like.
    other: leading-order counts of dense linear algebra (cholesky n^3/3, triangular solve n^2 m,
    LU 2n^3/3, QR, eigh/svd estimates). uncounted: names of floating-point primitives with no
    rule (sort, collectives, ...; counted as 0).
    """

    matmul: int = 0
    elementwise: int = 0
    transcendental: int = 0
    other: int = 0
    uncounted: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return self.matmul + self.elementwise + self.transcendental + self.other

    def __add__(self, o: FlopCount) -> FlopCount:
        return FlopCount(
            self.matmul + o.matmul,
            self.elementwise + o.elementwise,
            self.transcendental + o.transcendental,
            self.other + o.other,
            tuple(sorted(set(self.uncounted) | set(o.uncounted))),
        )

    def __mul__(self, k: int) -> FlopCount:
        k = int(k)
        return FlopCount(self.matmul * k, self.elementwise * k, self.transcendental * k, self.other * k, self.uncounted)

    __rmul__ = __mul__

    def as_dict(self) -> dict:
        return dict(
            total=self.total,
            matmul=self.matmul,
            elementwise=self.elementwise,
            transcendental=self.transcendental,
            other=self.other,
            uncounted=list(self.uncounted),
        )


# ----------------------------------------------------------------------------- primitive tables

_TRANSCENDENTAL = frozenset(
    """
exp exp2 log log1p expm1 tanh logistic erf erfc erf_inv sin cos tan asin acos atan sinh cosh asinh acosh
atanh atan2 pow sqrt rsqrt cbrt lgamma digamma igamma igammac igamma_grad_a random_gamma_grad bessel_i0e
bessel_i1e polygamma zeta regularized_incomplete_beta
""".split()
)
_ELEMENTWISE = frozenset(
    """
add add_any sub mul div rem neg max min abs sign floor ceil round nextafter clamp select_n square
eq ne lt le gt ge is_finite real imag conj complex reciprocal
""".split()
)
_REDUCTION = frozenset(
    """
reduce_sum reduce_max reduce_min reduce_prod argmax argmin cumsum cumprod cummax cummin cumlogsumexp
scatter-add scatter_add scatter-mul scatter_mul scatter-min scatter_min scatter-max scatter_max
""".split()
)
_FREE = frozenset(
    """
broadcast_in_dim reshape squeeze expand_dims transpose slice dynamic_slice dynamic_update_slice gather
scatter concatenate pad rev convert_element_type copy copy_p iota device_put reduce_precision
bitcast_convert_type sharding_constraint mesh_cast reshard pvary pbroadcast axis_index random_seed random_wrap
random_unwrap random_bits random_split random_fold_in threefry2x32 stop_gradient split optimization_barrier
empty empty2 full_like zeros_like tie_in name debug_callback stack
""".split()
)
_CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat": "jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}
_FOLDABLE = frozenset("add sub mul max min neg convert_element_type div floor_divide clamp".split())


def _size(aval) -> int:
    return int(math.prod(aval.shape)) if hasattr(aval, "shape") else 1


def _is_float(aval) -> bool:
    dtype = getattr(aval, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _open(j) -> tuple[Jaxpr, list]:
    return (j.jaxpr, list(j.consts)) if isinstance(j, ClosedJaxpr) else (j, [])


# ----------------------------------------------------------------------------- the walk


def _integer_pow_mults(y: int) -> int:
    """Multiplications of exponentiation by squaring (plus one reciprocal when negative)."""
    a = abs(int(y))
    if a <= 1:
        return int(y < 0)
    return a.bit_length() - 1 + bin(a).count("1") - 1 + int(y < 0)


def _dot_contracted(eqn) -> int:
    """K of a dot_general: the product of its contracted dimensions (1 if none)."""
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    return int(math.prod(eqn.invars[0].aval.shape[d] for d in lhs_contract))


def _conv_flops(eqn) -> int:
    rhs = eqn.invars[1].aval
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    per_output = _size(rhs) // rhs.shape[out_feature_dim]  # in_features/groups * kernel window
    return 2 * _size(eqn.outvars[0].aval) * per_output


def _linalg_flops(eqn) -> int | None:
    """Leading-order dense linear-algebra counts (batched over leading axes)."""
    name = eqn.primitive.name
    if name not in ("cholesky", "triangular_solve", "lu", "qr", "householder_product", "geqrf", "eigh", "svd", "eig"):
        return None
    a = eqn.invars[0].aval
    n = a.shape[-1]
    batch = math.prod(a.shape[:-2])
    if name == "cholesky":
        return batch * n**3 // 3
    if name == "triangular_solve":
        b = eqn.invars[1].aval
        return _size(b) * n  # n^2 m per (n, n) system with m right-hand sides
    m = a.shape[-2]
    if name == "lu":
        return batch * 2 * n**3 // 3 if m == n else batch * (m * n * n - n**3 // 3)
    if name in ("qr", "geqrf", "householder_product"):
        return batch * 2 * n * n * (m - n // 3)
    if name == "eigh":
        return batch * 9 * n**3  # tridiagonal reduction + QR iteration with vectors (Golub & Van Loan)
    if name == "svd":
        return batch * (4 * m * n * n + 8 * n**3)  # R-SVD with vectors
    return batch * 25 * n**3  # eig: Hessenberg + QR iteration with vectors


def _fold(eqn, known: dict):
    """Values of scalar outputs computable at trace time (constants of the program), or None."""
    if eqn.primitive.name not in _FOLDABLE or any(v.aval.shape for v in eqn.outvars):
        return None
    vals = []
    for v in eqn.invars:
        if isinstance(v, Literal):
            vals.append(v.val)
        elif v in known:
            vals.append(known[v])
        else:
            return None
    try:
        out = eqn.primitive.bind(*vals, **eqn.params)
    except Exception:  # noqa: BLE001 - folding is an optimisation, never required
        return None
    return [np.asarray(out)] if not eqn.primitive.multiple_results else [np.asarray(o) for o in out]


def _value(v, known: dict):
    if isinstance(v, Literal):
        return np.asarray(v.val)
    return known.get(v)


def _platform_index(platforms) -> int:
    """The branch ``lax.platform_dependent`` takes on the default backend."""
    backend = jax.default_backend()
    names = {backend, "cuda", "rocm"} if backend == "gpu" else {backend}
    for i, ps in enumerate(platforms):
        if ps is not None and names & set(ps):
            return i
    return next(i for i, ps in enumerate(platforms) if ps is None)


def _while_trips(eqn, known: dict) -> int:
    """Trip count of a counted while loop ``i = lo; while i < hi: ...; i += step`` with ``lo``,
    ``hi`` and ``step`` known at trace time (the form ``fori_loop`` and ``while_loop`` over an
    integer counter take). Anything else has no static cost: raise."""
    p = eqn.params
    cnc, bnc = p["cond_nconsts"], p["body_nconsts"]
    cond, _ = _open(p["cond_jaxpr"])
    body, _ = _open(p["body_jaxpr"])
    cond_consts, carry_init = eqn.invars[:cnc], eqn.invars[cnc + bnc :]
    err = ValueError(
        "jaxpr_flops: a while loop whose trip count is not known at trace time has no static FLOP count; "
        "use lax.scan or lax.fori_loop with Python-int bounds (or count one iteration yourself)"
    )
    if len(cond.eqns) != 1 or cond.eqns[0].primitive.name not in ("lt", "gt", "le", "ge", "ne"):
        raise err
    ce = cond.eqns[0]
    a, b = ce.invars
    op = ce.primitive.name
    if op in ("gt", "ge"):  # hi > i  ==  i < hi
        a, b, op = b, a, {"gt": "lt", "ge": "le"}[op]
    carry_in = list(cond.invars[cnc:])
    if isinstance(a, Literal) or a not in carry_in:
        raise err
    i = carry_in.index(a)

    def resolve(v):
        """Value of a cond-jaxpr variable at loop entry, if it is a constant or unchanged carry."""
        if isinstance(v, Literal):
            return np.asarray(v.val)
        if v in cond.invars[:cnc]:
            return _value(cond_consts[list(cond.invars[:cnc]).index(v)], known)
        j = carry_in.index(v)
        if body.outvars[j] is not body.invars[bnc + j]:
            return None  # the bound changes inside the loop
        return _value(carry_init[j], known)

    hi, lo = resolve(b), _value(carry_init[i], known)
    step = None
    for be in body.eqns:  # the counter's update: i + step with a literal step
        if be.outvars[0] is body.outvars[i] and be.primitive.name == "add" and body.invars[bnc + i] in be.invars:
            other = [v for v in be.invars if v is not body.invars[bnc + i]]
            step = _value(other[0], {}) if other else None
    if hi is None or lo is None or step is None or int(step) <= 0:
        raise err
    span = int(hi) - int(lo) + (1 if op == "le" else 0)
    if op == "ne":
        if span % int(step):
            raise err
        return max(0, span // int(step))
    return max(0, -(-span // int(step)))


def _param_key(v):
    if isinstance(v, (Jaxpr, ClosedJaxpr)):
        return ("jaxpr", id(v))  # jax caches traced jaxprs: the same object is the same computation
    if isinstance(v, (tuple, list)):
        return tuple(_param_key(x) for x in v)
    return repr(v)


def _cse_key(eqn, alias: dict):
    """Identity of an equation for common-subexpression elimination, or None for an effectful
    one (never merged)."""
    if eqn.effects:
        return None
    ins = tuple(("lit", repr(v.val), str(v.aval)) if isinstance(v, Literal) else alias.get(v, v) for v in eqn.invars)
    try:
        return (eqn.primitive.name, tuple(sorted((k, _param_key(v)) for k, v in eqn.params.items())), ins)
    except Exception:  # noqa: BLE001 - an unprintable parameter: do not merge
        return None


def _count(jaxpr: Jaxpr, known: dict, loop_consts: int | None = None, trips: int = 1) -> FlopCount:
    """Count a jaxpr run ``trips`` times. In a loop body (``loop_consts``: how many leading inputs
    are loop-invariant) equations that depend only on invariant values run once, as XLA hoists
    them out of the loop."""
    total = FlopCount()
    seen, alias = {}, {}  # CSE: XLA computes identical equations once (e.g. a repeated W^T W)
    invariant = set(jaxpr.constvars) | set(jaxpr.invars[: loop_consts or 0])
    for eqn in jaxpr.eqns:
        key = _cse_key(eqn, alias)
        if key is not None:
            if key in seen:
                for dup, first in zip(eqn.outvars, seen[key]):
                    alias[dup] = alias.get(first, first)
                    if first in known:
                        known[dup] = known[first]
                    if first in invariant:
                        invariant.add(dup)
                continue
            seen[key] = eqn.outvars
        folded = _fold(eqn, known)
        if folded is not None:  # a compile-time constant: XLA folds it
            known.update(zip(eqn.outvars, folded))
            invariant.update(eqn.outvars)
            continue
        hoisted = (
            loop_consts is not None
            and not eqn.effects
            and all(isinstance(v, Literal) or v in invariant for v in eqn.invars)
        )
        if hoisted:
            invariant.update(eqn.outvars)
        total = total + _eqn_flops(eqn, known) * (1 if hoisted else trips)
    return total


def _eqn_flops(eqn, known: dict) -> FlopCount:
    name, params = eqn.primitive.name, eqn.params
    if name in _CALLS:
        inner, _ = _open(params.get(_CALLS[name]) or next(iter(jax.extend.core.jaxprs_in_params(params))))
        sub_known = {
            iv: known[v] for iv, v in zip(inner.invars, eqn.invars) if not isinstance(v, Literal) and v in known
        }
        sub_known.update({iv: np.asarray(v.val) for iv, v in zip(inner.invars, eqn.invars) if isinstance(v, Literal)})
        return _count(inner, sub_known)
    elif name == "scan":
        inner, _ = _open(params["jaxpr"])
        nc = params["num_consts"]
        sub_known = {
            iv: _value(v, known) for iv, v in zip(inner.invars[:nc], eqn.invars[:nc]) if _value(v, known) is not None
        }
        return _count(inner, sub_known, nc, 1 if _LOOPS_ONCE.get() else params["length"])
    elif name == "while":  # the body runs trips times, the condition once more
        trips = 1 if _LOOPS_ONCE.get() else _while_trips(eqn, known)
        body, _ = _open(params["body_jaxpr"])
        cond, _ = _open(params["cond_jaxpr"])
        return _count(body, {}, params["body_nconsts"], trips) + _count(cond, {}, params["cond_nconsts"], trips + 1)
    elif name == "platform_index":  # lax.platform_dependent: resolved when lowering, so now
        known[eqn.outvars[0]] = np.int32(_platform_index(params["platforms"]))
    elif name == "cond":
        branches = [_count(_open(b)[0], {}) for b in params["branches"]]
        index = _value(eqn.invars[0], known)
        if index is not None:  # a constant index (platform-dependent code, switch on a literal)
            return branches[int(np.clip(index, 0, len(branches) - 1))]
        return max(branches, key=lambda c: c.total)
    elif name == "shard_map":  # the body runs on every device of the mesh
        inner, _ = _open(params["jaxpr"])
        return _count(inner, {}) * params["mesh"].size
    elif name == "dot_general":
        k = _dot_contracted(eqn)
        if k == 1:  # an outer (or elementwise) product: one multiply per output, as XLA rewrites it
            return FlopCount(elementwise=_size(eqn.outvars[0].aval))
        return FlopCount(matmul=2 * _size(eqn.outvars[0].aval) * k)
    elif name == "conv_general_dilated":
        return FlopCount(matmul=_conv_flops(eqn))
    elif name in _TRANSCENDENTAL:
        return FlopCount(transcendental=_size(eqn.outvars[0].aval))
    elif name in _ELEMENTWISE or name == "integer_pow":
        if any(_is_float(v.aval) for v in list(eqn.invars) + list(eqn.outvars)):
            per = _integer_pow_mults(params["y"]) if name == "integer_pow" else 1
            return FlopCount(elementwise=per * _size(eqn.outvars[0].aval))
    elif name in _REDUCTION:
        if name.startswith("scatter"):  # one combine per update element
            src, n = eqn.invars[2], _size(eqn.invars[2].aval)
        elif name.startswith("cum"):  # a running op over an axis of length k: k - 1 per row
            src = eqn.invars[0]
            n = _size(src.aval) - _size(src.aval) // max(src.aval.shape[params["axis"]], 1)
        else:  # k numbers reduce in k - 1 binary ops (XLA counts the same)
            src = eqn.invars[0]
            n = _size(src.aval) - _size(eqn.outvars[0].aval)
        if _is_float(src.aval):
            return FlopCount(elementwise=n)
    elif name in _FREE:
        pass
    elif (lin := _linalg_flops(eqn)) is not None:
        return FlopCount(other=int(lin))
    elif (subs := list(jax.extend.core.jaxprs_in_params(params))) and len(subs) == 1:
        return _count(_open(subs[0])[0], {})  # an unknown call-like primitive: once
    elif any(_is_float(v.aval) for v in eqn.outvars):
        return FlopCount(uncounted=(name,))
    return FlopCount()


_LOOPS_ONCE = contextvars.ContextVar("loops_once", default=False)


@contextlib.contextmanager
def _loops_once(on: bool):
    token = _LOOPS_ONCE.set(on)
    try:
        yield
    finally:
        _LOOPS_ONCE.reset(token)


def count_jaxpr(closed: ClosedJaxpr, dce: bool = True, loops_once: bool = False) -> FlopCount:
    """:class:`FlopCount` of a closed jaxpr, after removing the equations no output depends on.
    ``loops_once``: count every scan/while body once, whatever its trip count (XLA's cost
    analysis convention; for comparing with it, not a cost)."""
    with _loops_once(loops_once):
        return _count_closed(closed, dce)


def _count_closed(closed: ClosedJaxpr, dce: bool) -> FlopCount:
    jaxpr = closed.jaxpr
    if dce and _dce_jaxpr is not None:
        jaxpr, _ = _dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    known = {v: np.asarray(c) for v, c in zip(closed.jaxpr.constvars, closed.consts) if np.ndim(c) == 0}
    return _count(jaxpr, known)


def jaxpr_flops(fn, *args, **kwargs) -> FlopCount:
    """Analytic :class:`FlopCount` of ``fn(*args, **kwargs)`` from the jaxpr JAX traces for it.

    args: arrays, pytrees of arrays or ``jax.ShapeDtypeStruct`` (traced; only shapes matter);
    kwargs: passed through unchanged (static). Dead code is removed first. Raises ValueError for a
    while loop without a static trip count.
    """
    closed = jax.make_jaxpr(lambda *a: fn(*a, **kwargs))(*args)
    return count_jaxpr(closed)


def compiled_flops(fn, *args) -> float:
    """FLOPs of ``jax.jit(fn)(*args)`` from XLA's cost analysis of the compiled program
    (matmuls at 2 per multiply-add, elementwise ops at 1; gathers and scatters count 0;
    transcendentals are not included: see :func:`compiled_cost`)."""
    return compiled_cost(fn, *args)["flops"]


def compiled_cost(fn, *args) -> dict:
    """XLA's view of ``jax.jit(fn)(*args)``: ``flops`` and ``transcendentals`` from its cost
    analysis, and ``matmul``, the FLOPs of the ``dot`` instructions of the optimized HLO
    (``2 * output size * contracted size`` each). Like the cost analysis, a while/scan body is
    counted once, whatever its trip count."""
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returns one dict per device
        cost = cost[0]
    return dict(
        flops=float(cost.get("flops", 0.0)),
        transcendentals=float(cost.get("transcendentals", 0.0)),
        matmul=_hlo_dot_flops(compiled.as_text()),
    )


_HLO_DEF = re.compile(r"%([\w.\-]+) = \w+\[([\d,]*)\]")
_HLO_DOT = re.compile(r"= \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), %[\w.\-]+\),[^\n]*?lhs_contracting_dims=\{([\d,]*)\}")


def _hlo_dot_flops(text: str) -> float:
    """Sum of ``2 * output size * contracted size`` over the dot instructions of HLO text (NaN
    if a dot's operand shape cannot be read: the text format is not a stable interface)."""
    shapes = {m.group(1): [int(x) for x in m.group(2).split(",") if x] for m in _HLO_DEF.finditer(text)}
    total, dots = 0, 0
    for m in _HLO_DOT.finditer(text):
        lhs = shapes.get(m.group(2))
        if lhs is None:
            return float("nan")
        out = [int(x) for x in m.group(1).split(",") if x]
        total += 2 * math.prod(out) * math.prod(lhs[int(d)] for d in m.group(3).split(",") if d)
        dots += 1
    return float(total) if dots == text.count(" dot(") else float("nan")
