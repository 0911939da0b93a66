"""Fusion boundaries for XLA."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def materialize(x, min_ndim: int = 3):
    """``x`` computed into its own buffer, once. XLA fuses elementwise producers into every
    consumer, so an n^3 diagram sum read by several consumers (or through a transpose) would be
    recomputed per consumer with strided reads; a conditional is a fusion boundary it keeps (the
    CPU compiler drops ``optimization_barrier``). The predicate is true for every value, NaN
    included, but known only at run time; the other branch never runs. Arrays of fewer than
    ``min_ndim`` axes, and concrete (eager) arrays, pass unchanged."""
    if not (isinstance(x, jax.core.Tracer) and x.ndim >= min_ndim):
        return x  # eager arrays are buffers already
    probe = x.reshape(-1)[0]
    return jax.lax.cond((probe == probe) | (probe != probe), lambda: x, lambda: jnp.zeros_like(x))
