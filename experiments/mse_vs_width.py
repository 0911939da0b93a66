"""MSE of the estimated output mean vs width for each k_max, beside Monte Carlo at matched FLOPs.

For every width: ``networks`` He-initialised MLPs (``layers`` linear layers, N(0, I) input), a
cached Monte Carlo ground truth (:func:`cumjax.groundtruth.ground_truth`), and every estimator
variant scored as in ``mse_vs_flops`` (noise floor subtracted; upper bounds where unresolved). Per
variant: a log-log fit of MSE vs width over the resolved widths (slope and its standard error;
theory at fixed depth: -k_max), and the MSE Monte Carlo reaches with the same FLOPs,
``variance / (flops / forward_flops)``.

    python experiments/mse_vs_width.py --config configs/mse_vs_width_smoke.json --out results/

Writes ``<out>/mse_vs_width_<name>.json`` after every ground truth and variant (a rerun resumes)
and ``<out>/mse_vs_width_<name>.png``; ground truths are cached in ``<out>/gt_cache``.
"""

from __future__ import annotations

import argparse
import os

import jax
import mse_vs_flops as mvf  # shared networks, ground truths, variants
import numpy as np
from common import ResultStore, enable_x64, fit_power_law, load_config, save_figure_atomic, write_json_atomic

import cumjax as cj

REQUIRED = ("widths", "layers", "activation", "networks", "gt_samples", "orders", "kinds")


def check_config(cfg: dict) -> None:
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"config {cfg.get('name')!r} lacks {missing}")
    widths = cfg["widths"]
    if not widths or any(not isinstance(w, int) or w < 1 for w in widths) or len(set(widths)) != len(widths):
        raise ValueError(f"widths must be distinct positive ints, got {widths!r}")
    mvf.check_config(dict(cfg, width=max(widths), activations=[cfg["activation"]]), mvf.REQUIRED)


def fit_slope(widths, values) -> dict:
    """Least-squares slope of log(value) vs log(width) and its standard error (nan below 3 points)."""
    fit = fit_power_law(widths, values)
    return dict(slope=fit["slope"], slope_se=fit["stderr"], intercept=fit["intercept"], widths=list(widths))


def summarize(cfg, rows_by_width: dict, truths: dict) -> dict:
    """Per variant: MSE (or bound) per width, MC at matched FLOPs, the fitted slope."""
    out = {}
    for config in mvf.variants(cfg):
        name, pts, fit_w, fit_v = config.name, [], [], []
        for w in cfg["widths"]:
            r = rows_by_width[w].get(name)
            if r is None or r.get("status") != "ok":
                pts.append(
                    dict(
                        width=w,
                        status=None if r is None else r.get("status"),
                        reason=None if r is None else r.get("reason"),
                    )
                )
                continue
            t = truths[w]
            mc = t["output_variance"] * t["forward_flops"] / r["flops"]
            p = dict(
                width=w,
                status="ok",
                resolved=r["resolved"],
                flops=r["flops"],
                mc_matched_mse=mc,
                noise_floor=r["noise_floor"],
            )
            if r["resolved"]:
                p.update(mse=r["excess"], mse_se=r["excess_se"], advantage=mc / r["excess"])
                fit_w.append(w)
                fit_v.append(r["excess"])
            else:
                p.update(mse_upper=r["mse_upper"], advantage_lower=mc / r["mse_upper"])
            pts.append(p)
        out[name] = dict(k_max=config.k_max, points=pts, fit=fit_slope(fit_w, fit_v), theory_slope=-config.k_max)
    return out


def plot(summary: dict, cfg: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    for i, (name, s) in enumerate(summary.items()):
        c = f"C{i % 10}"
        ok = [p for p in s["points"] if p["status"] == "ok"]
        res = [p for p in ok if p["resolved"]]
        up = [p for p in ok if not p["resolved"]]
        f = s["fit"]
        lab = f"{name}: slope {f['slope']:.2f}" + (f" +- {f['slope_se']:.2f}" if np.isfinite(f["slope_se"]) else "")
        if res:
            ax.errorbar(
                [p["width"] for p in res],
                [p["mse"] for p in res],
                yerr=[p["mse_se"] for p in res],
                fmt="o-",
                color=c,
                capsize=3,
                label=lab,
            )
        if up:
            ax.errorbar(
                [p["width"] for p in up],
                [p["mse_upper"] for p in up],
                yerr=[[0.5 * p["mse_upper"] for p in up], [0] * len(up)],
                uplims=True,
                fmt="v",
                color=c,
                label=None if res else lab,
            )
        if ok:
            ax.plot(
                [p["width"] for p in ok],
                [p["mc_matched_mse"] for p in ok],
                "--",
                color=c,
                alpha=0.6,
                label=f"MC at {name}'s FLOPs",
            )
    floors = sorted(
        {(p["width"], p["noise_floor"]) for s in summary.values() for p in s["points"] if p["status"] == "ok"}
    )
    if floors:
        ax.plot(*zip(*floors), "k:", label="ground-truth noise floor")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("width")
    ax.set_ylabel("MSE per output coordinate (noise floor subtracted)")
    ax.set_title(f"{cfg['activation']}, {cfg['layers']} linear layers, {cfg['networks']} networks per width")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "mse_vs_width_smoke.json")
    )
    p.add_argument("--out", default="results")
    p.add_argument("--redo", default=None, help="regex: recompute the variants whose key matches")
    p.add_argument("--exclude", default=None, help="regex: variants not to run (recorded as skipped)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    check_config(cfg)
    enable_x64()  # float64 accumulation; arrays carry explicit dtypes

    name = f"mse_vs_width_{cfg['name']}"
    store = ResultStore(os.path.join(args.out, f"{name}.json"), meta=cfg)
    cache = os.path.join(args.out, "gt_cache")
    est = mvf.estimates_store(os.path.join(args.out, f"{name}_estimates.json"), cfg)
    act = cfg["activation"]
    print(f"device: {jax.devices()[0]}  config: {cfg['name']}")
    rows_by_width, truths = {}, {}
    for w in cfg["widths"]:
        spec = mvf.make_spec(w, int(cfg["layers"]), act, mvf.init_of(cfg))
        params = mvf.networks(cfg, spec)
        truth = mvf.truth_for(cfg, spec, params, cache, progress=not args.no_progress)
        tkey = f"n{w}/truth"
        if tkey not in store:
            n, floor = truth[2], float(np.mean(truth[1].astype(np.float64) ** 2))
            store.put(
                tkey,
                dict(
                    num_samples=n,
                    noise_floor=floor,
                    output_variance=floor * n,
                    seconds=truth[3],
                    forward_flops=cj.forward_flops(spec),
                ),
            )
        truths[w] = store[tkey]
        rows_by_width[w] = {}
        print(f"\nwidth {w}: ground truth {truth[2]:.3g} samples, noise floor {truths[w]['noise_floor']:.3e}")
        for config in mvf.variants(cfg):
            r = mvf.evaluate(
                store, f"n{w}/{config.name}", cfg, spec, params, truth, config, args.redo, est, args.exclude
            )
            rows_by_width[w][config.name] = r
            print("  " + mvf.fmt_row(r), flush=True)
    summary = summarize(cfg, rows_by_width, truths)
    store.data["summary"] = summary
    write_json_atomic(store.data, store.path)
    print(
        f"\nMSE - floor vs width ({act}, {cfg['layers']} linear layers); in brackets: Monte Carlo's MSE at the "
        "same FLOPs"
    )
    print(f"{'width':>6}" + "".join(f"{n:>26}" for n in summary))
    for i, w in enumerate(cfg["widths"]):
        cells = []
        for s in summary.values():
            q = s["points"][i]
            if q["status"] != "ok":
                cells.append(str(q["status"]))
            else:
                mse = f"{q['mse']:.2e}" if q["resolved"] else f"<{q['mse_upper']:.2e}"
                cells.append(f"{mse} [{q['mc_matched_mse']:.2e}]")
        print(f"{w:>6}" + "".join(f"{c:>26}" for c in cells))
    print(
        f"{'slope':>6}"
        + "".join(
            f"{(format(s['fit']['slope'], '.2f') + ' +- ' + format(s['fit']['slope_se'], '.2f')):>26}"
            for s in summary.values()
        )
    )
    print(f"{'theory':>6}" + "".join(f"{s['theory_slope']:>26}" for s in summary.values()))
    plot(summary, cfg, os.path.join(args.out, f"{name}.png"))
    print(f"\nwrote {store.path} and {name}.png")
    return store.data


if __name__ == "__main__":
    main()
