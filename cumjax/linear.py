"""The exact linear step: every tracked cumulant through ``x -> x @ W + b``."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from .lowrank import FactoredTensor
from .radial import RadialTensor

Array = jax.Array
Tower = dict  # degree -> RadialTensor | FactoredTensor


def contract_legs(core: Array, W: Array) -> Array:
    """``W`` on every leg of ``core`` ``(n_in,)*s`` -> ``(n_out,)*s``, one leg at a time, each a
    matrix product that keeps the axes in place (the first and last legs are plain GEMMs over the
    flattened other axes, a middle leg a GEMM batched over the axes before it): no transposes."""
    s = core.ndim
    if s == 0:
        return core
    n_in, n_out = W.shape
    for leg in range(s):
        before, after = core.shape[:leg], core.shape[leg + 1 :]
        x = core.reshape((math.prod(before), n_in, math.prod(after)))
        # x[p, a, q] W[a, c] -> [p, c, q]
        x = jnp.einsum("paq,ac->pcq", x, W) if after else jnp.einsum("pa,ac->pc", x[..., 0], W)[..., None]
        core = x.reshape(before + (n_out,) + after)
    return core


def linear_step(tower: Tower, W: Array, b: Array | None, metric, degrees) -> Tower:
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
        core = contract_legs(t.core, W)
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
