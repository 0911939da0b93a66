"""Cached, resumable, shardable Monte Carlo ground truth for many networks at once.

One jitted program streams a *block* of chunks for every network (params stacked on a leading
network axis and vmapped) through :mod:`cumjax.montecarlo`'s sampler; the per-block statistics are
merged into running ones (count, mean, sum of squared deviations, optionally E[x x^T]) with the same
parallel update the sampler uses. After every block the running statistics are written to
``<cache_dir>/<hash>.npz`` atomically (temp file + rename), so a killed run continues from the last
block and ends with bit-for-bit the numbers an uninterrupted run gives; a finished file is returned
without recomputation. The file name hashes everything the numbers depend on: the params' bytes,
the spec, the input mean and covariance, the sample count, the seed, the forward dtype and the
block layout.

Network ``i`` uses ``jax.random.split(PRNGKey(seed), B)[i]`` and sample ``j`` of it
``fold_in(that key, j)``, exactly as :func:`cumjax.monte_carlo_batched`, so the two agree to float
rounding. With a ``mesh`` the network axis is split over its devices (``jax.shard_map``; the
networks are padded to a multiple of the device count), with the same keys and samples.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from . import _sampling as smp
from . import montecarlo as mc
from ._io import atomic_write
from .gaussian import Gaussian
from .mlp import MLPSpec

_VERSION = 1  # bump when the file layout or the sampling changes


@dataclasses.dataclass(frozen=True)
class GroundTruthPlan:
    """Static layout of a ground-truth run: ``chunk`` rows per scan step, ``block_chunks`` steps per
    jitted call (and per checkpoint), ``num_blocks`` calls in all."""

    num_samples: int
    chunk: int
    block_chunks: int

    @property
    def block(self) -> int:
        return self.chunk * self.block_chunks

    @property
    def num_blocks(self) -> int:
        return -(-self.num_samples // self.block)


def make_plan(num_samples: int, chunk_size: int | None = None, block_chunks: int = 16) -> GroundTruthPlan:
    _, chunk, _ = mc.plan_chunks(num_samples, chunk_size)
    if isinstance(block_chunks, bool) or not isinstance(block_chunks, (int, np.integer)) or block_chunks < 1:
        raise ValueError(f"block_chunks must be a positive int, got {block_chunks!r}")
    block_chunks = min(int(block_chunks), -(-int(num_samples) // chunk))
    return GroundTruthPlan(int(num_samples), chunk, block_chunks)


def cache_key(
    batched_params,
    spec: MLPSpec,
    gaussian: Gaussian,
    num_samples: int,
    seed: int,
    dtype,
    plan: GroundTruthPlan,
    second_moments: bool,
) -> str:
    """Hex digest naming a ground truth: params bytes (with shapes and dtypes), spec, input, sample
    count, seed, forward dtype, accumulation dtype, block layout and whether E[x x^T] is kept."""
    h = hashlib.sha256()
    acc = "f64" if jax.config.jax_enable_x64 else "f32"
    h.update(
        repr(
            (_VERSION, spec, int(num_samples), int(seed), str(jnp.dtype(dtype)), acc, plan, bool(second_moments))
        ).encode()
    )
    leaves = jax.tree_util.tree_leaves_with_path(batched_params)
    mean = jnp.asarray(gaussian.mean, dtype)
    cov = np.eye(spec.input_dim) if smp.is_identity(gaussian.cov) else jnp.asarray(gaussian.cov, jnp.result_type(float))
    for path, x in leaves + [("mean", mean), ("cov", cov)]:
        a = np.ascontiguousarray(np.asarray(x))
        h.update(
            repr((jax.tree_util.keystr(path) if not isinstance(path, str) else path, a.shape, str(a.dtype))).encode()
        )
        h.update(a.tobytes())
    return h.hexdigest()[:24]


# ----------------------------------------------------------------------------- the jitted block


def _block_stats(keys, params, mean, factor, first, stop, *, spec, plan, second_moments):
    """Statistics of samples ``first <= j < stop`` for every network: vmap of the sampler's stream."""
    stream = lambda key, p: smp.stream(
        key,
        p,
        spec,
        mean,
        factor,
        first,
        stop,
        plan.block_chunks,
        plan.chunk,  # noqa: E731
        second_moments,
    )
    return jax.vmap(stream)(keys, params)


@functools.partial(jax.jit, static_argnames=("spec", "plan", "second_moments", "mesh"), donate_argnums=(0,))
def _step(state, keys, params, mean, factor, first, stop, *, spec, plan, second_moments, mesh):
    """``state`` merged with the next block (network axis leading everywhere)."""
    block = functools.partial(_block_stats, spec=spec, plan=plan, second_moments=second_moments)
    if mesh is not None:
        P = jax.sharding.PartitionSpec
        ax = P(mesh.axis_names[0])
        block = jax.shard_map(block, mesh=mesh, in_specs=(ax, ax, P(), P(), P(), P()), out_specs=ax, check_vma=False)
    new = block(keys, params, mean, factor, first, stop)
    return jax.vmap(smp.merge_stats)(state, new)


def _empty_state(spec, num_networks, second_moments):
    acc = smp.accumulation_dtype()
    one = smp.empty_stats(spec, second_moments, acc)
    return jax.tree_util.tree_map(lambda x: jnp.zeros((num_networks,) + x.shape, x.dtype), one)


# ----------------------------------------------------------------------------- checkpoints


def _save(path, state: smp.Stats, blocks_done: int, key: str) -> None:
    arrays = {"blocks_done": np.int64(blocks_done), "key": np.array(key), "count": np.asarray(state.count)}
    for name in ("mean", "m2", "second"):
        for label, x in (getattr(state, name) or {}).items():
            arrays[f"{name}/{label}"] = np.asarray(x)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def _load(path, template: smp.Stats, key: str):
    """``(state, blocks_done)`` from a checkpoint, or None if absent or for another run."""
    if not os.path.exists(path):
        return None
    with np.load(path) as z:
        if str(z["key"]) != key:
            return None
        field = lambda name: (
            None
            if getattr(template, name) is None
            else {  # noqa: E731
                k: jnp.asarray(z[f"{name}/{k}"]) for k in getattr(template, name)
            }
        )
        state = smp.Stats(jnp.asarray(z["count"]), field("mean"), field("m2"), field("second"))
        return state, int(z["blocks_done"])


# ----------------------------------------------------------------------------- public


def ground_truth(
    batched_params,
    spec: MLPSpec,
    gaussian: Gaussian,
    num_samples: int,
    seed: int = 0,
    *,
    cache_dir: str | None = None,
    chunk_size: int | None = None,
    block_chunks: int = 16,
    all_layers: bool = False,
    second_moments: bool = False,
    dtype=jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    max_blocks: int | None = None,
    partial: bool = False,
    progress: bool = True,
) -> mc.MCResult | None:
    """Monte Carlo statistics of ``B`` networks (``batched_params``: leaves with a leading axis B)
    on the input ``gaussian`` over ``num_samples`` samples each.

    Returns an :class:`cumjax.MCResult` whose fields have a leading network axis: ``mean`` and
    ``sem`` (B, n) and, with ``second_moments``, ``second`` (B, n, n), for the output label
    ``pre{L-1}`` only or, with ``all_layers``, every label (all layers are always sampled; the
    cache holds them all).
    cache_dir: where checkpoints and finished results live (None: no caching, no resume).
    block_chunks: chunks per jitted call; a checkpoint is written after each.
    mesh: a 1-D :class:`jax.sharding.Mesh`; the network axis is split over its devices.
    max_blocks: stop after this many *new* blocks and return None if not finished (to test resume,
        or to spread a long run over several calls).
    partial: if not finished, return the statistics of the samples done so far (the first
        ``blocks_done * block`` of them; ``num_samples`` says how many) instead of None.
    """
    plan = make_plan(num_samples, chunk_size, block_chunks)
    params, mean, factor = mc.prepare(batched_params, spec, gaussian, dtype, batch_dims=1)
    B = jax.tree_util.tree_leaves(params)[0].shape[0]
    key = cache_key(params, spec, gaussian, num_samples, seed, dtype, plan, second_moments)
    path = None if cache_dir is None else os.path.join(cache_dir, f"gt_{key}.npz")

    keys = jax.random.split(jax.random.PRNGKey(seed), B)
    pad = 0 if mesh is None else (-B) % mesh.size
    if pad:  # repeat network 0 so every device gets the same number; the copies are dropped at the end
        take = lambda x: jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)])  # noqa: E731
        params, keys = jax.tree_util.tree_map(take, params), take(keys)
    if mesh is not None:
        if len(mesh.axis_names) != 1:
            raise ValueError(f"need a 1-D mesh, got axes {mesh.axis_names}")
        shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names[0]))
        params, keys = jax.device_put((params, keys), shard)

    state = _empty_state(spec, B + pad, second_moments)
    done = 0
    loaded = None if path is None else _load(path, jax.tree_util.tree_map(lambda x: x[:B], state), key)
    if loaded is not None:
        state, done = loaded
        if pad:
            state = jax.tree_util.tree_map(lambda x: jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]), state)
    todo = plan.num_blocks - done if max_blocks is None else min(plan.num_blocks - done, max_blocks)
    bar = tqdm(
        total=plan.num_blocks,
        initial=done,
        desc=f"ground truth {B} nets x {num_samples:.3g}",
        unit="block",
        disable=not progress or todo == 0,
        leave=False,
    )
    for b in range(done, done + todo):
        first, stop = b * plan.block, min((b + 1) * plan.block, plan.num_samples)
        state = _step(
            state,
            keys,
            params,
            mean,
            factor,
            jnp.uint32(first),
            jnp.uint32(stop),
            spec=spec,
            plan=plan,
            second_moments=second_moments,
            mesh=mesh,
        )
        done = b + 1
        if path is not None:
            _save(path, jax.tree_util.tree_map(lambda x: x[:B], state), done, key)
        bar.update(1)
    bar.close()
    if done < plan.num_blocks and not (partial and done > 0):
        return None
    state = jax.tree_util.tree_map(lambda x: x[:B], state)
    res = mc.result_of(state, min(done * plan.block, plan.num_samples))
    keep = spec.labels if all_layers else (spec.labels[-1],)
    pick = lambda d: None if d is None else {k: d[k] for k in keep}  # noqa: E731
    return mc.MCResult(pick(res.mean), pick(res.sem), pick(res.second), res.num_samples)


def stack_networks(params_list):
    """Stack a list of param pytrees of one shape on a new leading network axis."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *params_list)
