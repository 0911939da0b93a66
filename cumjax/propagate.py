"""Cumulant propagation through an MLP: exact linear steps, truncated Wick expansion at each
nonlinearity (ARC, arXiv 2605.05179).

Between layers the state is a *tower*: ``{degree d: RadialTensor}`` holding the joint cumulants of
one layer up to the tracked degree. All combinatorics (which slices, diagrams, contractions) is
decided in Python at trace time from the static configuration, so under ``jax.jit`` one fused
program is compiled per (network shape, configuration).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import string
from collections import defaultdict
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import diagrams as dg
from . import activations as _act

Array = jax.Array
_LETTERS = string.ascii_letters


@dataclasses.dataclass(frozen=True)
class PropagationConfig:
    """Static configuration of one estimator (hashable: usable as a static jit argument).

    k_max: accuracy budget (the paper's K), 1..4; squared error ~ width^-k_max.
    kind: term set, ``"simple"`` or ``"augment"``.
    avg_metric: after hidden linear layers use E[W^T W] = w_var I instead of W^T W for the
        radial pieces (only matters where a degree is kept in radial form).
    factored: the factored k=3/4 term set (equals unfactored for ``simple``; for ``augment`` it
        drops the diagrams that admit no low-rank evaluation). Ignored for k_max <= 2.
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
        out = {}
        for d, r in dg.tracked_degrees(self.cfg.k_max, self.cfg.kind).items():
            if r == 0:
                core = self.dense(self.cumulant, d)
            else:
                core = 0.0
                coefs = dg.radial_core_coefs(self.n, d, r)
                for j, c in zip(range(r, d // 2 + 1), coefs):
                    tr = self.dense(lambda a, j=j: self.traced(d, j, a), d - 2 * j)
                    core = core + c * RadialTensor(tr, j - r, None, self.n).dense()
            out[d] = RadialTensor(core, r, None, self.n)
        return out


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

    def hidden_layer(tower, W, b, act, w_var):
        pre = _linear_step(tower, W, b, hidden_metric(w_var), list(tower))
        return pre, _NonlinearStep(pre, act, config).output()

    L = len(layers)
    w_vars = [None] * L if weight_variances is None else [float(v) for v in weight_variances]
    out = {}
    # Hidden layers after the first share one tower structure: with equal shapes and
    # activations, scan over them so compile time does not grow with depth.
    scan_from, scan_to = 1, L - 1
    scannable = not unroll and scan_to - scan_from >= 2 and len({activations[l] for l in range(scan_from, scan_to)}) == 1
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


def estimated_bytes(width: int, num_layers: int, config: PropagationConfig, itemsize: int = 4) -> int:
    """Rough peak memory of unfactored propagation: the dense order-k cores of every stored
    layer plus the working slices of one nonlinear step."""
    top = width ** config.k_max
    working = 12 if config.kind == "augment" else 6
    return int((2 * num_layers + working) * top * itemsize)


def available_bytes() -> int:
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
        raise MemoryError(
            f"unfactored propagation at width {width}, k_max={config.k_max} needs about {need / 2**30:.1f} GiB "
            f"(dense order-{config.k_max} cumulants, O(width^{config.k_max})), more than this machine has free "
            f"({available_bytes() / 2**30:.1f} GiB); use a smaller width or k_max. Removing that factor of width "
            f"needs the low-rank factored k=3/4 variant; cumjax's factored=True currently evaluates the factored "
            f"term set densely and needs the same memory"
        )
    if all(_concrete(x) for x in (mean, cov)):
        from .inputs import validate_gaussian_input

        validate_gaussian_input(mean, cov)
    for l, (W, b) in enumerate(layers):
        for name, x in (("kernel", W), ("bias", b)):
            if x is not None and _concrete(x) and not bool(jnp.all(jnp.isfinite(x))):
                raise ValueError(f"layer {l} {name} contains NaN or Inf")
