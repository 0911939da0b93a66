"""Cost and accuracy of cumulant propagation by order.

1. Wall time per hidden layer vs width for each k_max, with fitted log-log slopes printed next to
   the theoretical exponents (unfactored: k_max + 1 from the dense linear step, k_max = 1: 2).
2. MSE of the output mean of each order against a high-sample Monte Carlo ground truth, over
   several random networks per width, with fitted slopes of MSE vs width (theory at fixed depth:
   MSE ~ width^-k_max) and the ground truth's own noise floor beside each MSE.
3. Compile and run time at ``compile_width`` for every depth in ``compile_depths`` and k_max in
   ``compile_orders``.

    python experiments/bench_orders.py --config configs/bench_orders_smoke.json

Results are written atomically to ``<out>/bench_orders_<name>.json`` after every measurement, and a
rerun skips what is already there (resume after interruption).
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from common import enable_x64, fit_power_law, load_config, network, time_compiled, write_json_atomic

import cumjax as cj


def _time_estimate(spec, params, config, repeats=3):
    """``(compile s, fastest run s)`` of a jitted estimate of the output mean."""
    g = cj.Gaussian.standard(spec.input_dim, jax.tree_util.tree_leaves(params)[0].dtype)
    r = time_compiled(lambda p: cj.estimate_mean(p, spec, g, config), params, repeats=repeats)
    return r["compile_s"], r["run_s"]


def _slope(x, y):
    return fit_power_law(x, y)["slope"]


def timing(cfg, results, save):
    """Per-layer time = (t(L_long) - t(L_short)) / (L_long - L_short): first/last layers cancel."""
    short, long = cfg["timing_depths"]
    out = results.setdefault("timing", {})
    for k_str, widths in cfg["timing_widths"].items():
        k = int(k_str)
        config = cj.PropagationConfig(k_max=k, kind="simple", output_degree=1)
        for w in widths:
            key = f"k{k}_n{w}"
            if key in out:
                continue
            times = [
                _time_estimate(*network(0, w, depth, "relu", draw_dtype=jnp.float64), config)[1]
                for depth in (short, long)
            ]
            out[key] = dict(k=k, width=w, per_layer_s=max((times[1] - times[0]) / (long - short), 1e-9))
            save()
    print("\nwall time per hidden layer (float32, simple):")
    print(f"{'k_max':>6}{'widths':>22}{'fitted slope':>14}{'theory':>8}")
    for k_str in cfg["timing_widths"]:
        k = int(k_str)
        rows = sorted((r["width"], r["per_layer_s"]) for r in out.values() if r["k"] == k)
        ws, ts = zip(*rows)
        theory = 2 if k == 1 else k + 1
        results.setdefault("timing_slopes", {})[k_str] = dict(slope=_slope(ws, ts), theory=theory)
        print(f"{k:>6}{str(list(ws)):>22}{_slope(ws, ts):>14.2f}{theory:>8}")
        for w, t in rows:
            print(f"{'':>6}  n={w:<5} {t * 1e3:10.3f} ms/layer")


@functools.cache
def _estimator(spec, k):
    """Jitted float64 estimate of the output mean, compiled once per (shape, k_max)."""
    g = cj.Gaussian.standard(spec.input_dim, jnp.float64)
    return jax.jit(lambda p: cj.estimate_mean(p, spec, g, cj.PropagationConfig(k_max=k, output_degree=1)))


def accuracy(cfg, results, save):
    out = results.setdefault("accuracy", {})
    layers, samples, act = cfg["layers"], int(float(cfg["samples"])), cfg.get("activation", "relu")
    orders = cfg["orders"]
    for w in cfg["widths"]:
        for seed in range(cfg["networks"]):
            key = f"n{w}_s{seed}"
            if key in out:
                continue
            spec, params = network(1000 + seed, w, layers, act, draw_dtype=jnp.float64)
            g = cj.Gaussian.standard(w, jnp.float32)  # float32 compute, float64 sums
            mc = cj.monte_carlo(
                jax.random.PRNGKey(seed), params, spec, g, samples, chunk_size=cfg.get("chunk", 1 << 14)
            )
            label = f"pre{layers - 1}"
            gt, se2 = np.asarray(mc.mean[label], np.float64), np.asarray(mc.sem[label], np.float64) ** 2
            params64 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
            row = dict(width=w, seed=seed, noise_floor=float(se2.mean()), output_var=float(se2.mean() * samples))
            for k in orders:  # estimates in float64: their own rounding must not pollute the MSE
                if w**k > cfg.get("max_dense_entries", 2**25):
                    continue
                est = _estimator(spec, k)(params64)
                row[f"mse_k{k}"] = float(np.mean((np.asarray(est) - gt) ** 2))
            out[key] = row
            save()
            mses = " ".join(f"k{k} {row.get(f'mse_k{k}', float('nan')):.2e}" for k in orders)
            print(f"  width {w} net {seed}: {mses}  floor {row['noise_floor']:.2e}")
    print(
        f"\nMSE of the output mean vs Monte Carlo ({samples:.2g} samples; relu, {layers} linear layers), "
        "mean over networks:"
    )
    print(f"{'width':>6}" + "".join(f"{'k=' + str(k):>12}" for k in orders) + f"{'MC floor':>12}")
    widths = sorted({r["width"] for r in out.values()})
    table = {}
    for w in widths:
        rows = [r for r in out.values() if r["width"] == w]
        table[w] = {
            k: np.mean([r[f"mse_k{k}"] for r in rows if f"mse_k{k}" in r])
            if any(f"mse_k{k}" in r for r in rows)
            else np.nan
            for k in orders
        }
        floor = np.mean([r["noise_floor"] for r in rows])
        print(f"{w:>6}" + "".join(f"{table[w][k]:>12.3e}" for k in orders) + f"{floor:>12.3e}")
    print(f"{'slope':>6}", end="")
    for k in orders:
        # Fit only widths whose MSE stands clear of the noise floor (else the floor is fitted).
        pts = [
            (w, table[w][k] - np.mean([r["noise_floor"] for r in out.values() if r["width"] == w]))
            for w in widths
            if np.isfinite(table[w][k])
        ]
        pts = [(w, m) for w, m in pts if m > 2 * np.mean([r["noise_floor"] for r in out.values() if r["width"] == w])]
        s = _slope(*zip(*pts)) if len(pts) >= 2 else float("nan")
        results.setdefault("mse_slopes", {})[str(k)] = dict(slope=s, theory=-k, widths=[w for w, _ in pts])
        print(f"{s:>12.2f}", end="")
    print("   (theory: -k_max; only widths with MSE > 2x floor are fitted)")


def compile_times(cfg, results, save):
    out = results.setdefault("compile", {})
    for k in cfg["compile_orders"]:
        for depth in cfg["compile_depths"]:
            key = f"k{k}_L{depth}"
            if key not in out:
                spec, params = network(0, cfg["compile_width"], depth, "relu", draw_dtype=jnp.float64)
                c, r = _time_estimate(spec, params, cj.PropagationConfig(k_max=k, output_degree=1), repeats=1)
                out[key] = dict(k=k, layers=depth, compile_s=c, run_s=r)
                save()
    print(f"\ncompile and run time at width {cfg['compile_width']} (float32, simple, jit):")
    for r in out.values():
        print(f"  k_max={r['k']} layers={r['layers']:>3}: compile {r['compile_s']:6.2f} s  run {r['run_s']:8.4f} s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "bench_orders_smoke.json")
    )
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    enable_x64()  # float64 accumulation; arrays are created with explicit dtypes
    cfg = load_config(args.config)
    path = os.path.join(args.out, f"bench_orders_{cfg['name']}.json")
    results = {}
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
    save = lambda: write_json_atomic(results, path)  # noqa: E731
    print(f"device: {jax.devices()[0]}  config: {cfg['name']}")
    timing(cfg, results, save)
    compile_times(cfg, results, save)
    accuracy(cfg, results, save)
    save()
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
