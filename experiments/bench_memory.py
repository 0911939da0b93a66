"""The memory model against XLA's own buffer assignment, without running anything.

For every case of the config (width, depth, k_max, term set, factored, rank_layers, dtype, and
``"scheduler": "memory"`` for XLA's memory-optimised CPU instruction scheduler, a compiler option
of that one program, instead of its default) it compiles one jitted ``estimate_mean`` on abstract
arguments and reads XLA's buffer assignment of the compiled program (arguments + outputs +
temporaries, minus aliased bytes) next to :func:`cumjax.estimated_bytes`; the ratio model / XLA
is the number to keep near 1 (above 1: the model refuses runs that fit; below 1: it admits runs
that may not). Compiling a k4 augment program at width 256 takes about a minute; nothing is
allocated beyond the compiler's own memory.

    python experiments/bench_memory.py --config configs/bench_memory.json --out results/
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
from common import ResultStore, enable_x64, load_config, timed

import cumjax as cj
from cumjax import propagation

# XLA's CPU scheduler orders the program's instructions, and so decides which n^3 working slices
# are live at once; the default is tuned for concurrency, this one for memory.
SCHEDULERS = {"memory": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}}


def xla_bytes(spec: cj.MLPSpec, config: cj.PropagationConfig, dtype, compiler_options=None) -> int:
    """Peak bytes of XLA's buffer assignment for ``jit(estimate_mean)`` (compiled with
    ``compiler_options``, not run)."""
    params = jax.eval_shape(lambda k: cj.init_params(k, spec, dtype=dtype), jax.random.PRNGKey(0))
    n = spec.input_dim
    g = cj.Gaussian(jax.ShapeDtypeStruct((n,), dtype), jax.ShapeDtypeStruct((n, n), dtype))
    fn = jax.jit(lambda p, g: cj.estimate_mean(p, spec, g, config))
    # nothing is allocated, so the model's admission check (the thing measured) is not applied
    check, propagation.check_memory = propagation.check_memory, lambda *a: None
    try:
        m = fn.lower(params, g).compile(compiler_options=compiler_options).memory_analysis()
    finally:
        propagation.check_memory = check
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "bench_memory.json"))
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    store = ResultStore(os.path.join(args.out, f"bench_memory_{cfg['name']}.json"), meta=cfg)
    if any(jnp.dtype(c.get("dtype", "float32")).itemsize == 8 for c in cfg["cases"]):
        enable_x64()  # float32 cases keep float32 arguments, so their programs are unchanged
    print(f"{'case':<40}{'model GiB':>11}{'XLA GiB':>10}{'model/XLA':>11}{'compile s':>11}")
    unknown = {c["scheduler"] for c in cfg["cases"] if c.get("scheduler") not in (None, *SCHEDULERS)}
    if unknown:
        raise ValueError(f"unknown scheduler {sorted(unknown)}; known: {sorted(SCHEDULERS)} (or none: XLA's default)")
    for case in cfg["cases"]:
        width, depth, dtype = int(case["width"]), int(case["depth"]), jnp.dtype(case.get("dtype", "float32"))
        config = cj.PropagationConfig(
            k_max=case["k_max"],
            kind=case.get("kind", "simple"),
            factored=case.get("factored", True),
            rank_layers=case.get("rank_layers"),
            output_degree=1,
        )
        scheduler = case.get("scheduler")  # None: XLA's default
        key = f"{config.name}/n{width}/L{depth}/{dtype.name}" + (f"/{scheduler}-scheduler" if scheduler else "")
        spec = cj.MLPSpec(width, width, width, depth, ("relu",) * (depth - 1))

        def run(spec=spec, config=config, dtype=dtype, width=width, depth=depth, opts=SCHEDULERS.get(scheduler)):
            xla, seconds = timed(lambda: xla_bytes(spec, config, dtype, opts))
            model = cj.estimated_bytes(width, depth, config, dtype.itemsize)
            return dict(model_bytes=model, xla_bytes=xla, ratio=model / xla, compile_s=seconds)

        r = store.get_or_compute(key, run)
        print(
            f"{key:<40}{r['model_bytes'] / 2**30:>11.2f}{r['xla_bytes'] / 2**30:>10.2f}{r['ratio']:>11.2f}"
            f"{r['compile_s']:>11.1f}",
            flush=True,
        )
    store.put("done", True)
    return store.data


if __name__ == "__main__":
    main()
