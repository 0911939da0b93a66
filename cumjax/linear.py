"""The exact linear step: every tracked cumulant through ``x -> x @ W + b``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .lowrank import FactoredTensor
from .radial import RadialTensor

Array = jax.Array
Tower = dict  # degree -> RadialTensor | FactoredTensor


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
