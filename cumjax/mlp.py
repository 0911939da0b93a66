"""MLPs in Flax, their initialisers, and conversions of their parameters.

Layer labels: ``pre{l}`` is the output of linear layer ``l`` (``x @ W_l + b_l``) and ``act{l}`` the
output of hidden layer ``l``'s nonlinearity, ``phi_l(pre{l})``; the input is ``act{-1}`` and the last
label ``pre{L-1}`` is the network output (no nonlinearity follows the last linear layer). The paper
counts from one: ``act{l}`` is its X_{l+1}, ``pre{l}`` its Z_{l+1}.

Parameters are Flax variables ``{"params": {"layer{l}": {"kernel": (in, out), "bias": (out,)}}}``.
Matmuls run at ``Precision.HIGHEST``: on GPUs the default float32 precision is TF32, whose rounding of
the weights (~3e-4 relative) would bias a Monte Carlo ground truth by about as much.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .activations import activation_fn, check_activation
from .gaussian import is_concrete

HIGHEST = jax.lax.Precision.HIGHEST


def _per_layer(value, num_layers: int, name: str) -> tuple[float, ...]:
    if np.ndim(value) == 0:
        return (float(value),) * num_layers
    if len(value) != num_layers:
        raise ValueError(f"{name} needs one entry per linear layer ({num_layers}), got {len(value)}")
    return tuple(float(v) for v in value)


@dataclasses.dataclass(frozen=True)
class Init:
    """Initialisation: ``W_l`` entries ``N(0, w_var_l / fan_in)``, bias entries ``N(b_mean_l, b_var_l)``.

    kind:
      * ``"he"``: ``w_var_0 = 1``, ``w_var_l = 1 / E[phi_{l-1}(Z)^2]`` with ``Z ~ N(b_mean_{l-1}, 1)``
        (relu 2, tanh ~2.536, ...); ``b_var`` does not enter the weight variances.
      * ``"critical"``: edge of chaos with fixed point ``q_star`` (one activation for all hidden
        layers): ``s_w = 1 / E[phi'(sqrt(q*) Z)^2]``, ``s_b = q* - s_w E[phi(sqrt(q*) Z)^2]``; every
        layer gets ``b_var = s_b``, ``b_mean = 0``, layer 0 ``w_var = q* - s_b``, the others ``s_w``.
      * ``"manual"``: ``w_var`` given.
    w_var, b_var, b_mean: a scalar or one value per linear layer (finite; variances >= 0).
    """

    kind: str = "he"
    q_star: float | None = None
    w_var: float | tuple[float, ...] | None = None
    b_var: float | tuple[float, ...] = 0.0
    b_mean: float | tuple[float, ...] = 0.0

    def __post_init__(self):
        if self.kind not in ("he", "critical", "manual"):
            raise ValueError(f"unknown init kind {self.kind!r}; expected 'he', 'critical' or 'manual'")
        for f in ("w_var", "b_var", "b_mean", "q_star"):
            v = getattr(self, f)
            if v is None:
                continue
            try:
                a = np.asarray(v, dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"Init.{f} must be a number or a sequence of numbers, got {v!r}") from None
            if a.ndim > 1 or isinstance(v, bool) or not np.all(np.isfinite(a)):
                raise ValueError(f"Init.{f} must be finite numbers (a scalar or one per linear layer), got {v!r}")
            if f != "b_mean" and np.any(a < 0):
                raise ValueError(f"Init.{f} must be >= 0, got {v!r}")
            # lists -> tuples of floats, so that Init stays hashable
            object.__setattr__(self, f, tuple(float(x) for x in a) if a.ndim else float(a))
        if self.kind == "critical":
            if self.q_star is None or not self.q_star > 0:
                raise ValueError(f"critical init needs q_star > 0, got {self.q_star}")
            if np.any(np.asarray(self.b_var) != 0) or np.any(np.asarray(self.b_mean) != 0):
                raise ValueError("critical init sets the biases itself: leave b_var and b_mean at 0")
        if (self.kind == "manual") != (self.w_var is not None):
            raise ValueError("w_var is required by, and only used by, manual init")

    def resolve(self, spec: MLPSpec) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
        """``(w_var, b_var, b_mean)``, one Python float per linear layer; ``w_var`` is fan_in * Var(W)."""
        # x64 sets the precision of the integrals
        return _resolve(self, spec.activations, spec.num_layers, jax.config.jax_enable_x64)

    def _resolve(self, activations: tuple[str, ...], L: int):
        from .activations import gaussian_expectation

        if self.kind == "critical":
            s_w, s_b = critical_variances(activations, self.q_star)
            return (self.q_star - s_b,) + (s_w,) * (L - 1), (s_b,) * L, (0.0,) * L
        b_var, b_mean = _per_layer(self.b_var, L, "b_var"), _per_layer(self.b_mean, L, "b_mean")
        if self.kind == "manual":
            return _per_layer(self.w_var, L, "w_var"), b_var, b_mean
        second = [float(gaussian_expectation(act, 0, 2, b_mean[l], 1.0)) for l, act in enumerate(activations)]
        w_var = (1.0,) + tuple(1.0 / s for s in second)
        return w_var, b_var, b_mean

    def bias_layers(self, spec: MLPSpec) -> tuple[bool, ...]:
        """Per linear layer: does it draw a nonzero bias (``b_var > 0`` or ``b_mean != 0``)?"""
        return _draws_bias(*self.resolve(spec)[1:])


@functools.lru_cache(maxsize=256)
def _resolve(init: Init, activations: tuple[str, ...], num_layers: int, x64: bool):
    with jax.ensure_compile_time_eval():  # python floats even when called under a jit trace
        return init._resolve(activations, num_layers)


def _draws_bias(b_var, b_mean) -> tuple[bool, ...]:
    return tuple(v > 0 or m != 0 for v, m in zip(b_var, b_mean))


def critical_variances(activations: Sequence[str], q_star: float) -> tuple[float, float]:
    """``(s_w, s_b)`` putting a network at the edge of chaos with fixed point ``q_star`` (see Init).

    Raises ValueError when no such point exists (step functions, or ``s_b < 0``)."""
    from .activations import gaussian_expectation, squared_slope_expectation

    if len(set(activations)) > 1:
        raise ValueError(f"critical init needs one activation for all hidden layers, got {sorted(set(activations))}")
    if not activations:  # a single linear layer: nothing to make critical
        return 1.0, 0.0
    name = activations[0]
    slope = float(squared_slope_expectation(name, 0.0, q_star))
    if not slope > 0:
        raise ValueError(f"critical init infeasible for {name}: E[phi'(Z)^2] = {slope}")
    s_w = 1.0 / slope
    s_b = q_star - s_w * float(gaussian_expectation(name, 0, 2, 0.0, q_star))
    if s_b < -1e-6:
        raise ValueError(
            f"critical init infeasible for {name} at q*={q_star}: it would need bias variance {s_b:.4g} < 0"
        )
    return s_w, max(s_b, 0.0)  # clip rounding noise around 0 (relu: exactly 0)


def _is_dim(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class MLPSpec:
    """Static description of an MLP and of the random ensemble its weights are drawn from
    (hashable: a static jit argument).

    num_layers: linear layers (>= 1); activations: one name (or :class:`cumjax.Activation`) per
    hidden layer (``num_layers - 1``), or a single one used for all of them; init: the
    initialisation (:class:`Init`; its weight variances are what ``avg_metric`` uses); use_bias:
    whether every linear layer has a bias (default: whether ``init`` draws any nonzero bias).
    """

    input_dim: int
    width: int
    output_dim: int
    num_layers: int
    activations: tuple[str, ...] = ()
    use_bias: bool | None = None
    init: Init = Init()

    def __post_init__(self):
        from .activations import Activation, register_activation

        dims = (self.input_dim, self.width, self.output_dim, self.num_layers)
        if not all(_is_dim(v) for v in dims):
            raise ValueError(f"MLPSpec dimensions must be ints, got {dims}")
        if self.num_layers < 1 or min(dims[:3]) < 1:
            raise ValueError(f"need num_layers >= 1 and positive dimensions, got {dims}")
        acts = self.activations
        acts = (acts,) * (self.num_layers - 1) if isinstance(acts, (str, Activation)) else tuple(acts)
        if len(acts) != self.num_layers - 1:
            raise ValueError(f"{self.num_layers} linear layers need {self.num_layers - 1} activations, got {len(acts)}")
        acts = tuple(register_activation(a).name if isinstance(a, Activation) else check_activation(a) for a in acts)
        object.__setattr__(self, "activations", acts)
        if not isinstance(self.init, Init):
            raise ValueError(f"MLPSpec.init must be a cumjax.Init, got {type(self.init).__name__}")
        object.__setattr__(self, "num_layers", int(self.num_layers))
        draws = any(_draws_bias(*_resolve(self.init, acts, self.num_layers, jax.config.jax_enable_x64)[1:]))
        if self.use_bias is None:
            object.__setattr__(self, "use_bias", draws)
        elif not isinstance(self.use_bias, (bool, np.bool_)):
            raise ValueError(f"use_bias must be True, False or None, got {self.use_bias!r}")
        elif draws and not self.use_bias:
            raise ValueError("this init draws nonzero biases: leave use_bias at None (or True)")

    @property
    def dims(self) -> tuple[int, ...]:
        """Layer sizes ``(input_dim, width, ..., width, output_dim)``, ``num_layers + 1`` of them."""
        return (self.input_dim,) + (self.width,) * (self.num_layers - 1) + (self.output_dim,)

    @property
    def labels(self) -> tuple[str, ...]:
        """``("pre0", "act0", ..., "act{L-2}", "pre{L-1}")`` (see the module docstring)."""
        L = self.num_layers
        return tuple(f"{kind}{l}" for l in range(L) for kind in ("pre", "act") if kind == "pre" or l < L - 1)

    @property
    def weight_variances(self) -> tuple[float, ...]:
        """Per linear layer, ``fan_in * Var(W_l)`` of the initialisation (the average metric's scale)."""
        return self.init.resolve(self)[0]


def _default_float():
    return jnp.result_type(float)  # float64 when jax x64 is enabled, else float32


class MLP(nn.Module):
    """Flax MLP: Dense layers ``layer0 .. layer{L-1}`` with ``spec.activations`` between them,
    initialised by ``spec.init``; ``param_dtype`` defaults to jax's default float.
    ``__call__(x (..., input_dim))`` returns the output ``(..., output_dim)``, or with
    ``all_layers=True`` the dict ``{label: (..., size)}`` of every layer.
    """

    spec: MLPSpec
    param_dtype: Any = None
    precision: Any = HIGHEST

    @nn.compact
    def __call__(self, x, all_layers: bool = False):
        spec = self.spec
        w_var, b_var, b_mean = spec.init.resolve(spec)
        out = {}
        for l, size in enumerate(spec.dims[1:]):

            def kernel_init(key, shape, dtype, l=l):  # N(0, w_var / fan_in); python floats keep dtype
                return math.sqrt(w_var[l] / shape[0]) * jax.random.normal(key, shape, dtype)

            def bias_init(key, shape, dtype, l=l):  # N(b_mean, b_var): constant b_mean when b_var == 0
                return b_mean[l] + math.sqrt(b_var[l]) * jax.random.normal(key, shape, dtype)

            x = nn.Dense(
                size,
                use_bias=spec.use_bias,
                name=f"layer{l}",
                param_dtype=self.param_dtype or _default_float(),
                precision=self.precision,
                kernel_init=kernel_init,
                bias_init=bias_init,
            )(x)
            out[f"pre{l}"] = x
            if l < spec.num_layers - 1:
                x = activation_fn(spec.activations[l])(x)
                out[f"act{l}"] = x
        return out if all_layers else x


def init_params(key, spec: MLPSpec, dtype=None):
    """Random Flax variables ``{"params": {"layer{l}": {"kernel": (in, out)[, "bias": (out,)]}}}``
    drawn from ``spec.init``. dtype: defaults to jax's default float (float32; float64 with x64)."""
    if isinstance(dtype, Init):
        raise TypeError(
            "init_params(key, spec, dtype=None): the initialisation is part of the spec, MLPSpec(..., init=Init(...))"
        )
    if not isinstance(spec, MLPSpec):
        raise TypeError(f"spec must be a cumjax.MLPSpec, got {type(spec).__name__}")
    dtype = jnp.dtype(dtype or _default_float())
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ValueError(f"params dtype must be float32 or float64, got {dtype}")
    return _init_params(key, spec, dtype)


@functools.partial(jax.jit, static_argnums=(1, 2))  # one compile per network shape, not one per eager op
def _init_params(key, spec: MLPSpec, dtype):
    return MLP(spec, dtype).init(key, jnp.zeros((1, spec.input_dim), dtype))


def layer_weights(params) -> list[tuple[jax.Array, jax.Array | None]]:
    """``[(W (in, out), b (out,) or None), ...]`` in layer order, from Flax variables, their inner
    ``"params"`` dict, or a list of ``(W, b)`` pairs."""
    if isinstance(params, (list, tuple)):
        if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in params):
            raise ValueError("params as a list must hold (kernel, bias or None) pairs")
        return [(W, b) for W, b in params]
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be Flax variables (a dict), got {type(params).__name__}")
    inner = params["params"] if "params" in params else params
    names = [f"layer{l}" for l in range(len(inner))]
    if sorted(inner) != sorted(names):
        raise ValueError(f"params must hold layers named layer0..layer{len(inner) - 1}, got {sorted(inner)}")
    for k in names:
        if not isinstance(inner[k], Mapping) or "kernel" not in inner[k]:
            raise ValueError(f"params {k} has no 'kernel'")
    return [(inner[k]["kernel"], inner[k].get("bias")) for k in names]


def validate_params(params, spec: MLPSpec, batch_dims: int = 0) -> list[tuple[Any, Any]]:
    """Check that ``params`` fit ``spec``: the layer count, each kernel ``(dims[l], dims[l+1])`` and
    bias ``(dims[l+1],)`` after ``batch_dims`` leading axes, a float32/float64 dtype, and, where
    the values are concrete (not traced), finite. Raise ValueError naming the layer; return the layers."""
    layers = layer_weights(params)
    if len(layers) != spec.num_layers:
        raise ValueError(f"params have {len(layers)} linear layers, spec says {spec.num_layers}")
    for l, (W, b) in enumerate(layers):
        fan_in, fan_out = spec.dims[l], spec.dims[l + 1]
        for name, a, want in (("kernel", W, (fan_in, fan_out)), ("bias", b, (fan_out,))):
            if a is None:
                continue
            if np.ndim(a) != batch_dims + len(want) or np.shape(a)[batch_dims:] != want:
                raise ValueError(
                    f"params layer{l} {name} has shape {np.shape(a)}, expected {want}"
                    + (f" after {batch_dims} batch axes" if batch_dims else "")
                )
            dtype = np.dtype(a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype)
            if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
                raise ValueError(f"params layer{l} {name} has dtype {dtype}; cumjax computes in float32 or float64")
            # numpy on concrete values: never traced, no compile per shape
            if is_concrete(a) and not np.isfinite(np.asarray(a)).all():
                raise ValueError(f"params layer{l} {name} contains NaN or Inf")
    return layers


def params_from_arrays(Ws: Sequence, bs: Sequence | None = None, dtype=None):
    """Flax variables from plain arrays: ``Ws[l] (in, out)``, ``bs[l] (out,)`` or None (no bias)."""
    bs = [None] * len(Ws) if bs is None else list(bs)
    if len(bs) != len(Ws):
        raise ValueError(f"{len(Ws)} kernels but {len(bs)} biases")
    out = {}
    for l, (W, b) in enumerate(zip(Ws, bs)):
        out[f"layer{l}"] = {"kernel": jnp.asarray(W, dtype)} | ({} if b is None else {"bias": jnp.asarray(b, dtype)})
    return {"params": out}


def params_to_arrays(params) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """``(Ws, bs)`` as numpy arrays, ``bs[l] = None`` for a layer without bias."""
    layers = layer_weights(params)
    return [np.asarray(W) for W, _ in layers], [None if b is None else np.asarray(b) for _, b in layers]


def forward(params, spec: MLPSpec, x, all_layers: bool = False, precision=HIGHEST):
    """``MLP(spec).apply(params, x)`` as a pure function of the params pytree (one matmul per layer).

    x: (..., input_dim). Returns the output (..., output_dim), or ``{label: (..., size)}``."""
    out = {}
    for l, (W, b) in enumerate(layer_weights(params)):
        x = jnp.matmul(x, W, precision=precision)
        x = x if b is None else x + b
        out[f"pre{l}"] = x
        if l < spec.num_layers - 1:
            x = activation_fn(spec.activations[l])(x)
            out[f"act{l}"] = x
    return out if all_layers else x


def load_golden(path: str, dtype=None):
    """Read a reference golden ``.npz``: ``(spec, params, meta, arrays)``.

    ``spec.init`` is manual with the golden's ``init_scale`` (per linear layer, fan_in * Var(W)).
    ``arrays``: ``Kin_1 (d,)``, ``Kin_2 (d, d)`` and every ``{label}_K{d}`` (dense symmetric, numpy
    float64). Bias arrays are zero for layers without bias; ``spec.use_bias`` is
    ``any(meta["has_bias"])`` (any nonzero bias if absent)."""
    with np.load(path) as z:
        files = {k: z[k] for k in z.files}
    meta = json.loads(str(files["meta"]))
    L = meta["num_layers"]
    Ws, bs = [files[f"W{l}"] for l in range(L)], [files[f"b{l}"] for l in range(L)]
    use_bias = bool(any(meta.get("has_bias", [np.any(b) for b in bs])))
    init = Init(kind="manual", w_var=tuple(meta["init_scale"]))
    spec = MLPSpec(meta["input_dim"], meta["width"], meta["output_dim"], L, tuple(meta["nonlin"]), use_bias, init)
    params = params_from_arrays(Ws, bs if use_bias else None, dtype)
    validate_params(params, spec)
    arrays = {k: v for k, v in files.items() if k in ("Kin_1", "Kin_2") or "_K" in k}
    return spec, params, meta, arrays
