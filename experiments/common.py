"""Plumbing shared by the experiment scripts: configs, result files, timing, fits, networks, scoring.

Scripts run as ``python experiments/<name>.py --config configs/<name>.json --out results/``; Python
puts this folder on the path, so ``import common`` needs no path edits (the tests get it from
``pythonpath`` in pyproject.toml).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import cumjax as cj
from cumjax._io import atomic_write, write_json_atomic

__all__ = [
    "ResultStore",
    "compare_to_truth",
    "enable_x64",
    "fit_power_law",
    "load_config",
    "matmul_peak",
    "network",
    "networks",
    "save_figure_atomic",
    "time_compiled",
    "timed",
    "write_json_atomic",
]

#: The one scoring rule (the CLI uses it too): squared error minus the truth's noise, and the
#: Monte-Carlo-FLOP-equivalence ratio with its bounds.
compare_to_truth = cj.compare_to_truth


def enable_x64() -> None:
    """Turn on float64 for this process (scripts only; the library never flips it): Monte Carlo
    then accumulates in float64 while every array keeps the dtype it is created with."""
    jax.config.update("jax_enable_x64", True)


# ----------------------------------------------------------------------------- files


def load_config(path: str) -> dict:
    """A JSON experiment config; its ``name`` defaults to the file's stem."""
    with open(path) as f:
        cfg = json.load(f)
    cfg.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return cfg


def save_figure_atomic(fig, path: str, **kwargs) -> None:
    """``fig.savefig`` through a temp file + rename, then close the (pyplot) figure."""
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, **kwargs))
    plt.close(fig)


class ResultStore:
    """A JSON dict on disk that is rewritten atomically after every new entry, so a run that is
    interrupted resumes where it stopped: ``store.get_or_compute(key, fn)`` only calls ``fn`` for
    keys not already saved. Values must be JSON-serialisable. A store written under another
    ``meta`` (configuration) is started over rather than mixed."""

    def __init__(self, path: str, meta: dict | None = None):
        self.path = path
        self.data: dict[str, Any] = {}
        if os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)
        if meta is not None:
            if self.data.get("meta", meta) != meta:
                self.data = {}
            self.data["meta"] = meta
        self.data.setdefault("entries", {})

    def __contains__(self, key: str) -> bool:
        return key in self.data["entries"]

    def __getitem__(self, key: str):
        return self.data["entries"][key]

    def put(self, key: str, value) -> None:
        self.data["entries"][key] = value
        write_json_atomic(self.data, self.path)

    def get_or_compute(self, key: str, fn: Callable[[], Any]):
        if key not in self:
            self.put(key, fn())
        return self[key]

    @property
    def entries(self) -> dict:
        return self.data["entries"]


# ----------------------------------------------------------------------------- timing


def timed(fn: Callable, *args) -> tuple[Any, float]:
    """``(fn(*args), seconds)``, waiting for the result."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def time_compiled(fn: Callable, *args, repeats: int = 1) -> dict:
    """Compile ``jax.jit(fn)`` for ``args``, then run it ``repeats`` times: ``{out, compile_s,
    run_s (the fastest run), runs (every run's seconds)}``. Compilation is never in a run time."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    runs, out = [], None
    for _ in range(max(1, repeats)):
        out, s = timed(compiled, *args)
        runs.append(s)
    return dict(out=out, compile_s=compile_s, run_s=min(runs), runs=runs)


def matmul_peak(width: int, rows: int = 8192, repeats: int = 5) -> float:
    """GFLOP/s of ``(rows, width) @ (width, width)`` chained 8 times in float32: the peak a
    chain of dense layers of this width reaches on this machine, to measure others against in the
    same run."""
    x = jax.random.normal(jax.random.PRNGKey(0), (rows, width), jnp.float32)
    w = jax.random.normal(jax.random.PRNGKey(1), (width, width), jnp.float32) / width**0.5

    def chain(x, w):
        for _ in range(8):
            x = x @ w
        return x

    return 8 * 2 * rows * width * width / time_compiled(chain, x, w, repeats=repeats)["run_s"] / 1e9


# ----------------------------------------------------------------------------- fits


def fit_power_law(x, y) -> dict:
    """Least-squares fit of ``log y = slope log x + intercept``: ``{slope, stderr, intercept}``
    (stderr NaN with two points)."""
    from scipy import stats

    x, y = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    if len(x) < 2:
        return dict(slope=float("nan"), stderr=float("nan"), intercept=float("nan"))
    if len(x) == 2:
        slope = float((y[1] - y[0]) / (x[1] - x[0]))
        return dict(slope=slope, stderr=float("nan"), intercept=float(y[0] - slope * x[0]))
    fit = stats.linregress(x, y)
    return dict(slope=float(fit.slope), stderr=float(fit.stderr), intercept=float(fit.intercept))


# ----------------------------------------------------------------------------- networks


def network(
    seed: int,
    width: int,
    layers: int,
    activation: str,
    init: cj.Init = cj.Init(),
    dtype=jnp.float32,
    input_dim: int | None = None,
    output_dim: int | None = None,
    use_bias: bool | None = None,
    draw_dtype=None,
) -> tuple[cj.MLPSpec, dict]:
    """``(spec, params)`` of one random MLP: ``layers`` linear layers of ``width`` (input and
    output default to ``width``), ``activation`` after every hidden layer, drawn from ``init``
    with ``PRNGKey(seed)`` in ``draw_dtype`` (default ``dtype``; each script keeps the draw its
    recorded results came from) and cast to ``dtype``. use_bias: as in :class:`cumjax.MLPSpec`
    (default: whether ``init`` draws biases; True gives trainable biases even where they start at
    zero)."""
    spec = cj.MLPSpec(input_dim or width, width, output_dim or width, layers, activation, use_bias=use_bias, init=init)
    return spec, _cast(cj.init_params(jax.random.PRNGKey(seed), spec, dtype=draw_dtype or dtype), dtype)


def networks(seed: int, count: int, spec: cj.MLPSpec, dtype=jnp.float32) -> dict:
    """``count`` networks of ``spec`` (keys ``PRNGKey(seed + i)``, drawn in ``dtype``) stacked on a
    leading network axis."""
    ps = [cj.init_params(jax.random.PRNGKey(seed + i), spec, dtype=dtype) for i in range(count)]
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *ps)


def _cast(params, dtype):
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
