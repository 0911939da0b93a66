"""Cost per layer vs depth: the exact factored estimator against the bounded-rank mode.

For every (k_max, term set, rank_layers) of the config and every depth, one jitted
``estimate_mean`` on a He ReLU network of ``width``: compile time, best-of-``repeats`` run time,
the time per hidden layer and its ratio to the shallowest depth's, all measured in one run (the
bounded mode's target: at most 1.5x from depth 4 to 16; the exact mode's rank, and so its cost
per layer, grows with depth), and the marginal time per added layer between consecutive depths
(the first layers of a bounded run are cheaper, their rank not yet saturated, so the average per
layer still rises a little where the marginal cost is already constant).

    python experiments/bench_depth.py --config configs/bench_depth_smoke.json --out results/
"""

from __future__ import annotations

import argparse
import os

import jax.numpy as jnp
from common import ResultStore, load_config, network, time_compiled

import cumjax as cj


def variants(cfg) -> list[cj.PropagationConfig]:
    return [
        cj.PropagationConfig(k_max=k, kind=kind, factored=True, output_degree=1, rank_layers=m)
        for k in cfg["orders"]
        for kind in cfg["kinds"]
        for m in cfg["rank_layers"]
    ]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "bench_depth_smoke.json")
    )
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    n, depths = int(cfg["width"]), sorted(cfg["depths"])
    store = ResultStore(os.path.join(args.out, f"bench_depth_{cfg['name']}.json"), meta=cfg)
    dtype = jnp.dtype(cfg.get("dtype", "float32"))
    print(f"width {n}, {dtype}; run s per hidden layer (ratio to depth {depths[0]})")
    for config in variants(cfg):
        cells, marginal, last = [], [], None
        for L in depths:
            key = f"{config.name}/L{L}"
            if cfg.get("max_exact_depth") and config.rank_layers is None and L > cfg["max_exact_depth"]:
                cells.append("-")
                continue

            def run(L=L, config=config):
                spec, params = network(int(cfg.get("seed", 0)), n, L, "relu", dtype=dtype)
                g = cj.Gaussian.standard(n, dtype)
                r = time_compiled(lambda q: cj.estimate_mean(q, spec, g, config), params, repeats=int(cfg["repeats"]))
                return dict(run_s=r["run_s"], compile_s=r["compile_s"], per_layer_s=r["run_s"] / (L - 1))

            r = store.get_or_compute(key, run)
            base = store.entries.get(f"{config.name}/L{depths[0]}")
            ratio = r["per_layer_s"] / base["per_layer_s"] if base else float("nan")
            r = dict(r, ratio_to_shallowest=ratio)
            store.entries[key] = r
            cells.append(f"{r['per_layer_s']:.3g} ({ratio:.2f}x)")
            if last is not None:
                marginal.append(f"{(r['run_s'] - last[1]) / (L - last[0]):.3g}")
            last = (L, r["run_s"])
        print(f"{config.name:<22}" + "".join(f"{c:>20}" for c in cells), flush=True)
        print(f"{'  marginal s/layer':<42}" + "".join(f"{c:>20}" for c in marginal), flush=True)
    store.put("done", True)
    return store.data


if __name__ == "__main__":
    main()
