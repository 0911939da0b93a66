"""Analytic FLOP counts against XLA's cost analysis, per estimator and width, and per Monte Carlo sample.

For every (width, k_max, kind, factored) of the config: the analytic count of one estimate of the
output mean (:func:`cumjax.flops.estimator_flop_report`: jaxpr walk of the scanned and unrolled
programs, XLA's count of the unrolled one, their ratio, and the ratio of the matmul parts: the
jaxpr's dot_generals vs the dots of XLA's optimized HLO); for every width: Monte Carlo's per-sample
count (``forward_flops`` vs the jaxpr and XLA counts of one chunk of the sampler).

    python experiments/bench_flops.py --config configs/bench_flops_smoke.json --out results/

Writes ``<out>/bench_flops_<name>.json`` after every measurement (a rerun resumes) and
``<out>/bench_flops_<name>.png`` (ratio vs width per estimator).
"""

from __future__ import annotations

import argparse
import os

import jax.numpy as jnp
import numpy as np
from common import ResultStore, load_config, network, save_figure_atomic
from tqdm import tqdm

import cumjax as cj
from cumjax import flops

_KEYS = ("widths", "orders", "kinds", "layers")


def _check(cfg: dict) -> None:
    missing = [k for k in _KEYS if k not in cfg]
    if missing:
        raise ValueError(f"config {cfg.get('name')!r} lacks {missing}")
    for k in cfg["orders"]:
        cj.PropagationConfig(k_max=int(k))  # raises on a bad k_max
    for kind in cfg["kinds"]:
        cj.PropagationConfig(kind=kind)
    if int(cfg["layers"]) < 2 or any(int(w) < 1 for w in cfg["widths"]):
        raise ValueError("need layers >= 2 and positive widths")


def _configs(cfg):
    for k in cfg["orders"]:
        for kind in cfg["kinds"]:
            for fac in cfg.get("factored", [False]):
                if fac and k < 3:
                    continue
                yield cj.PropagationConfig(k_max=int(k), kind=kind, factored=bool(fac))


def _net(width, layers, activation):
    spec, params = network(0, width, layers, activation)
    return spec, params, cj.Gaussian.standard(width, jnp.float32)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "bench_flops_smoke.json")
    )
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    _check(cfg)
    act, layers = cfg.get("activation", "relu"), int(cfg["layers"])
    max_entries = float(cfg.get("max_dense_entries", 2**24))
    store = ResultStore(os.path.join(args.out, f"bench_flops_{cfg['name']}.json"), meta=cfg)
    # dense order-k_max cumulants (w^k entries) must fit; the factored path keeps order k_max - 1
    work = [
        (w, c)
        for w in cfg["widths"]
        for c in _configs(cfg)
        if w ** (c.k_max - (c.factored and c.k_max >= 3)) <= max_entries
    ]
    for w, c in tqdm(work, desc="estimators"):

        def measure(w=w, c=c):
            spec, params, g = _net(w, layers, act)
            return dict(width=w, estimator=c.name, **flops.estimator_flop_report(params, spec, g, c))

        store.get_or_compute(f"n{w}_{c.name}", measure)
    for w in tqdm(cfg["widths"], desc="monte carlo"):

        def measure_mc(w=w):
            spec, params, _ = _net(w, layers, act)
            chunk = int(cfg.get("mc_chunk", 1024))
            return dict(
                width=w, estimator="monte_carlo", **flops.montecarlo_flop_report(params, spec, chunk_size=chunk)
            )

        store.get_or_compute(f"n{w}_monte_carlo", measure_mc)

    rows = list(store.entries.values())
    print(f"\nanalytic / XLA FLOPs (float32, {act}, {layers} linear layers; XLA on the unrolled program)")
    print(f"{'estimator':<22}{'width':>6}{'analytic':>12}{'matmul %':>10}{'XLA':>12}{'ratio':>8}{'matmul ratio':>14}")
    for r in sorted(rows, key=lambda r: (r["estimator"], r["width"])):
        if r["estimator"] == "monte_carlo":
            print(
                f"{'MC chunk per sample':<22}{r['width']:>6}{r['chunk_jaxpr']:>12.4g}{'':>10}{r['chunk_xla']:>12.4g}"
                f"{r['ratio']:>8.3f}   (forward pass: forward_flops {r['analytic']:.4g})"
            )
        else:
            share = 100 * r["analytic_matmul"] / r["analytic"]
            print(
                f"{r['estimator']:<22}{r['width']:>6}{r['analytic']:>12.4g}{share:>10.1f}"
                f"{r['xla']:>12.4g}{r['ratio']:>8.3f}{r['matmul_ratio']:>14.3f}"
            )
    _plot(rows, os.path.join(args.out, f"bench_flops_{cfg['name']}.png"))
    return store.entries


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = sorted({r["estimator"] for r in rows})
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(names), 2)))
    for name, color in zip(names, colors):
        pts = sorted((r["width"], r["ratio"]) for r in rows if r["estimator"] == name)
        fac = "fac" in name
        ax.plot(*zip(*pts), marker="s" if fac else "o", ls="--" if fac else "-", color=color, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_xlabel("width")
    ax.set_ylabel("analytic / XLA FLOPs")
    ax.set_title("unfactored k_max=4: XLA counts the lax.map body once", fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure_atomic(fig, path)


if __name__ == "__main__":
    main()
