"""MLPs in Flax, their initialisers, and conversions of their parameters.

Layer labels: ``pre{l}`` is the output of linear layer ``l`` (``x @ W_l + b_l``) and ``act{l}`` the
output of hidden layer ``l``'s nonlinearity; the input is ``act{-1}`` and the last label
``pre{L-1}`` is the network output (no nonlinearity follows the last linear layer). The paper
counts from one: ``act{l}`` is its X_{l+1}, ``pre{l}`` its Z_{l+1}.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .activations import activation_fn, check_activation, gaussian_expectation, squared_slope_expectation


@dataclasses.dataclass(frozen=True)
class MLPSpec:
    """Static shape of an MLP: ``num_layers`` linear layers, one activation per hidden layer."""

    input_dim: int
    width: int
    output_dim: int
    num_layers: int
    activations: tuple[str, ...]
    use_bias: bool = False

    def __post_init__(self):
        if isinstance(self.activations, str):
            object.__setattr__(self, "activations", (self.activations,) * (self.num_layers - 1))
        object.__setattr__(self, "activations", tuple(self.activations))
        if self.num_layers < 1 or min(self.input_dim, self.width, self.output_dim) < 1:
            raise ValueError(f"need num_layers >= 1 and positive dimensions, got {self}")
        if len(self.activations) != self.num_layers - 1:
            raise ValueError(f"{self.num_layers} linear layers need {self.num_layers - 1} activations, got {len(self.activations)}")
        for a in self.activations:
            check_activation(a)

    @property
    def dims(self) -> tuple[int, ...]:
        """Layer sizes: input, hidden widths, output."""
        return (self.input_dim,) + (self.width,) * (self.num_layers - 1) + (self.output_dim,)

    @property
    def labels(self) -> tuple[str, ...]:
        out = []
        for l in range(self.num_layers):
            out += [f"pre{l}"] + ([f"act{l}"] if l < self.num_layers - 1 else [])
        return tuple(out)


def _per_layer(value, num_layers: int, name: str) -> tuple[float, ...]:
    if value is None:
        return (0.0,) * num_layers
    if np.ndim(value) == 0:
        return (float(value),) * num_layers
    if len(value) != num_layers:
        raise ValueError(f"{name} needs one entry per linear layer ({num_layers}), got {len(value)}")
    return tuple(float(v) for v in value)


@dataclasses.dataclass(frozen=True)
class Init:
    """Initialisation: weights ``W_l ~ N(0, w_var_l / fan_in)``, biases ``N(b_mean_l, b_var_l)``.

    kind:
      * ``"he"``: ``w_var_0 = 1`` and ``w_var_l = 1 / E[phi_{l-1}(Z)^2]``, ``Z ~ N(b_mean_{l-1}, 1)``,
        which keeps unit pre-activation second moments (relu: 2, tanh: ~2.536, ...).
      * ``"critical"``: edge of chaos at fixed point ``q_star``: ``sigma_w^2 E[phi'(sqrt(q*) Z)^2] = 1``
        and ``q* = sigma_w^2 E[phi(sqrt(q*) Z)^2] + sigma_b^2``; every layer gets ``b_var = sigma_b^2``,
        layer 0 gets ``w_var = q* - sigma_b^2``, the others ``sigma_w^2``.
      * ``"manual"``: ``w_var`` given (scalar or per layer).
    b_var, b_mean: scalar or per linear layer (ignored by ``critical``).
    """

    kind: str = "he"
    q_star: float | None = None
    w_var: float | tuple[float, ...] | None = None
    b_var: float | tuple[float, ...] = 0.0
    b_mean: float | tuple[float, ...] = 0.0

    def __post_init__(self):
        if self.kind not in ("he", "critical", "manual"):
            raise ValueError(f"unknown init kind {self.kind!r}; expected 'he', 'critical' or 'manual'")
        for f in ("w_var", "b_var", "b_mean"):
            v = getattr(self, f)
            if v is not None and np.ndim(v):
                object.__setattr__(self, f, tuple(float(x) for x in v))
        if self.kind == "critical" and (self.q_star is None or self.q_star <= 0):
            raise ValueError("critical init needs q_star > 0")
        if self.kind == "manual" and self.w_var is None:
            raise ValueError("manual init needs w_var (scalar or one per linear layer)")

    def resolve(self, spec: MLPSpec) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
        """Per linear layer ``(w_var, b_var, b_mean)``; ``w_var`` is ``fan_in * Var(W)``."""
        L = spec.num_layers
        if self.kind == "critical":
            w, b = critical_variances(spec.activations, self.q_star)
            return (self.q_star - b,) + (w,) * (L - 1), (b,) * L, (0.0,) * L
        b_var, b_mean = _per_layer(self.b_var, L, "b_var"), _per_layer(self.b_mean, L, "b_mean")
        if self.kind == "manual":
            return _per_layer(self.w_var, L, "w_var"), b_var, b_mean
        w_var = [1.0]
        for l in range(1, L):
            second = float(gaussian_expectation(spec.activations[l - 1], 0, 2, np.float64(b_mean[l - 1]), np.float64(1.0)))
            w_var.append(1.0 / second)
        return tuple(w_var), b_var, b_mean


def critical_variances(activations: Sequence[str], q_star: float) -> tuple[float, float]:
    """``(sigma_w^2, sigma_b^2)`` putting a network at the edge of chaos with fixed point ``q_star``."""
    if len(set(activations)) > 1:
        raise ValueError(f"critical init needs one activation for all hidden layers, got {sorted(set(activations))}")
    if not activations:
        return 1.0, 0.0
    name = activations[0]
    q = np.float64(q_star)
    slope = float(squared_slope_expectation(name, np.float64(0.0), q))
    if not slope > 0:
        raise ValueError(f"critical init infeasible for {name}: E[phi'^2] = {slope}")
    s_w = 1.0 / slope
    s_b = q_star - s_w * float(gaussian_expectation(name, 0, 2, np.float64(0.0), q))
    if s_b < -1e-6:
        raise ValueError(f"critical init infeasible for {name} at q*={q_star}: it would need bias variance {s_b:.4g} < 0")
    return s_w, max(s_b, 0.0)


def has_bias(spec: MLPSpec, init: Init) -> bool:
    _, b_var, b_mean = init.resolve(spec)
    return any(v > 0 for v in b_var) or any(m != 0 for m in b_mean)


class MLP(nn.Module):
    """Flax MLP: ``num_layers`` Dense layers named ``layer{l}``, activations between them.

    ``w_var``/``b_var``/``b_mean`` (per layer) set the initialisers; see :class:`Init`.
    ``__call__(x, all_layers=True)`` returns ``{label: array}`` for every layer.
    """

    spec: MLPSpec
    w_var: tuple[float, ...] | None = None
    b_var: tuple[float, ...] | None = None
    b_mean: tuple[float, ...] | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, all_layers: bool = False):
        spec, out = self.spec, {}
        L = spec.num_layers
        w_var = self.w_var or (1.0,) * L
        b_var, b_mean = self.b_var or (0.0,) * L, self.b_mean or (0.0,) * L
        for l, width in enumerate(spec.dims[1:]):

            def bias_init(key, shape, dtype=jnp.float32, l=l):
                return b_mean[l] + jnp.sqrt(b_var[l]) * jax.random.normal(key, shape, dtype)

            x = nn.Dense(width, use_bias=spec.use_bias, name=f"layer{l}", param_dtype=self.param_dtype, dtype=self.param_dtype,
                         kernel_init=nn.initializers.variance_scaling(w_var[l], "fan_in", "normal"),
                         bias_init=bias_init)(x)
            out[f"pre{l}"] = x
            if l < L - 1:
                x = activation_fn(spec.activations[l])(x)
                out[f"act{l}"] = x
        return out if all_layers else x


def init_params(key, spec: MLPSpec, init: Init = Init(), dtype=None):
    """Random Flax variables ``{"params": {"layer{l}": {"kernel": (in, out), "bias": (out,)}}}``
    in ``dtype`` (float32 by default).

    Biases exist iff ``spec.use_bias``; an init with nonzero bias mean/variance needs it.
    """
    w_var, b_var, b_mean = init.resolve(spec)
    if has_bias(spec, init) and not spec.use_bias:
        raise ValueError("this init has nonzero biases: build the MLPSpec with use_bias=True")
    dtype = dtype or jnp.float32
    module = MLP(spec, w_var, b_var, b_mean, dtype)
    return module.init(key, jnp.zeros((1, spec.input_dim), dtype))


def layer_weights(params) -> list[tuple[jax.Array, jax.Array | None]]:
    """``[(W (in, out), b (out,) or None), ...]`` in layer order from Flax variables (or a list)."""
    if isinstance(params, (list, tuple)):
        return [(W, b) for W, b in params]
    inner = params.get("params", params)
    names = sorted(inner, key=lambda s: int(s.removeprefix("layer")))
    return [(inner[k]["kernel"], inner[k].get("bias")) for k in names]


def params_from_arrays(Ws: Sequence, bs: Sequence | None = None, dtype=None):
    """Flax variables from plain arrays ``W{l} (in, out)`` and optional biases ``b{l}``."""
    out = {}
    for l, W in enumerate(Ws):
        layer = {"kernel": jnp.asarray(W, dtype)}
        if bs is not None and bs[l] is not None:
            layer["bias"] = jnp.asarray(bs[l], dtype)
        out[f"layer{l}"] = layer
    return {"params": out}


def params_to_arrays(params) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """``(Ws, bs)`` as numpy arrays (``None`` for a layer without bias)."""
    layers = layer_weights(params)
    return [np.asarray(W) for W, _ in layers], [None if b is None else np.asarray(b) for _, b in layers]


def forward(params, spec: MLPSpec, x, all_layers: bool = False):
    """Pure forward pass on the params pytree (``x (..., input_dim)``): the output or every label."""
    out = {}
    for l, (W, b) in enumerate(layer_weights(params)):
        x = x @ W if b is None else x @ W + b
        out[f"pre{l}"] = x
        if l < spec.num_layers - 1:
            x = activation_fn(spec.activations[l])(x)
            out[f"act{l}"] = x
    return out if all_layers else x


def load_golden(path: str, dtype=None):
    """A reference golden file: ``(spec, params, init_scale, meta, arrays)``.

    ``arrays`` maps ``"{label}_K{d}"`` and ``Kin_1``/``Kin_2`` to numpy arrays.
    """
    z = np.load(path)
    meta = json.loads(str(z["meta"]))
    L = meta["num_layers"]
    bs = [z[f"b{l}"] for l in range(L)]
    use_bias = any(meta.get("has_bias", [bool(np.any(b)) for b in bs]))
    spec = MLPSpec(meta["input_dim"], meta["width"], meta["output_dim"], L, tuple(meta["nonlin"]), use_bias)
    params = params_from_arrays([z[f"W{l}"] for l in range(L)], bs if use_bias else None, dtype)
    arrays = {k: z[k] for k in z.files if k == "Kin_1" or k == "Kin_2" or "_K" in k}
    return spec, params, tuple(meta["init_scale"]), meta, arrays
