"""MSE of every layer's estimated mean vs depth, beside Monte Carlo at equal FLOPs.

The paper's depth sweep: for every width, ``networks`` He-initialised MLPs of ``layers`` linear
layers (N(0, I) input), one all-layer Monte Carlo ground truth per network (cached, resumable), and
every estimator variant read at every layer ``pre{l}``. Per variant and layer: MSE per coordinate
with the ground truth's noise floor subtracted (an upper bound where not resolved), and the
Monte-Carlo-FLOP-equivalence ratio against sampling the first ``l + 1`` layers, with the
estimator's FLOPs counted on the same truncated network. Per variant: a fit of log MSE against
log(layer + 1) over the resolved layers, and the first layer at which sampling wins at equal FLOPs
(the ratio falls below 1) -- the headline. A layer where the estimate of some network is not
finite has diverged: it is scored as an infinite error (sampling wins there at any budget).

    python experiments/mse_vs_depth.py --config configs/mse_vs_depth_smoke.json --out results/

``--widths`` and ``--only REGEX`` run a part of the sweep into the same store (the rest keep their
rows). Writes ``<out>/mse_vs_depth_<name>.json`` after every ground truth and variant (a rerun resumes;
estimates in ``<out>/mse_vs_depth_<name>_estimates.json``, ground truths in ``<out>/gt_cache``)
and ``<out>/mse_vs_depth_<name>.png`` (MSE vs layer and ratio vs layer, one column per width).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import mse_vs_flops as mvf  # networks, ground truths, estimator runs
import mse_vs_width as mvw  # config checks
import numpy as np
from common import ResultStore, compare_to_truth, enable_x64, fit_power_law, load_config, save_figure_atomic

import cumjax as cj
from cumjax import diagrams as dg


def check_config(cfg: dict) -> None:
    """mse_vs_width's checks, and a depth of at least 2 and valid ``exclude`` patterns."""
    mvw.check_config(cfg)
    if not isinstance(cfg["layers"], int) or cfg["layers"] < 2:
        raise ValueError(f"layers must be an int >= 2, got {cfg['layers']!r}")
    for pattern in cfg.get("exclude", {}).values():
        re.compile(pattern)


def variants(cfg) -> list[cj.PropagationConfig]:
    """k_max 1, 2 dense; k_max 3, 4 factored (dense too with ``dense_high``; bounded-rank too for
    each ``rank_layers`` m); each also with the average metric where it changes anything (a radial
    degree is tracked): ``avg_metric`` true, or a list of the orders to run it for."""
    out = []
    for k in cfg["orders"]:
        for kind in cfg["kinds"]:
            fac = k >= 3 and cfg.get("factored", True)
            base = [cj.PropagationConfig(k_max=k, kind=kind, factored=fac, output_degree=1)]
            if fac and cfg.get("dense_high", False):
                base.insert(0, cj.PropagationConfig(k_max=k, kind=kind, output_degree=1))
            if fac:  # the bounded-rank mode: only the last m layers' rank blocks
                base += [dataclasses.replace(base[-1], rank_layers=m) for m in cfg.get("rank_layers", [])]
            radial = any(r > 0 for r in dg.tracked_degrees(k, kind).values())
            for c in base:
                out.append(c)
                avg = cfg.get("avg_metric", False)  # true, or the orders to run it for
                if radial and (avg is True or (isinstance(avg, list) and k in avg)):
                    out.append(dataclasses.replace(c, avg_metric=True))
    return out


def truncated(spec: cj.MLPSpec, depth: int) -> cj.MLPSpec:
    """The first ``depth`` linear layers as a network of their own (output ``pre{depth-1}``);
    their params are the first ``depth`` entries of the full network's."""
    return dataclasses.replace(spec, num_layers=depth, output_dim=spec.width, activations=spec.activations[: depth - 1])


def layer_means(p, spec: cj.MLPSpec, g: cj.Gaussian, config: cj.PropagationConfig):
    """``(L, n)``: the estimated mean of every ``pre{l}``."""
    res = cj.propagate(p, spec, g, dataclasses.replace(config, output_degree=1))
    return jnp.stack([res.mean(f"pre{l}") for l in range(spec.num_layers)])


def layer_flops(cfg, spec, params, config) -> list[float]:
    """Analytic FLOPs of the estimate of each ``pre{l}``: the estimator run on the first ``l + 1``
    layers (network 0 of ``params``)."""
    one = jax.tree_util.tree_map(lambda x: jnp.asarray(x[0], mvf.DTYPES[mvf.estimator_dtype(cfg, config)]), params)
    g = cj.Gaussian.standard(spec.input_dim, jax.tree_util.tree_leaves(one)[0].dtype)
    first = lambda d: {"params": {f"layer{l}": one["params"][f"layer{l}"] for l in range(d)}}  # noqa: E731
    return [cj.estimator_flops(first(d), truncated(spec, d), g, config) for d in range(1, spec.num_layers + 1)]


def excluded(cfg, width: int, name: str) -> str | None:
    """The config's reason to skip this variant at this width (``exclude``: width -> regex)."""
    pattern = cfg.get("exclude", {}).get(str(width))
    if pattern and re.search(pattern, name):
        return f"excluded at width {width} by the config (exclude {pattern!r})"
    return None


def score(cfg, spec, est, truth, fl) -> list[dict]:
    """Per layer: :func:`compare_to_truth` against sampling the first ``l + 1`` layers. A layer
    where the estimate of any network is not finite (NaN in ``est``) has diverged: its error is
    infinite, and sampling wins there at any budget (ratio 0)."""
    mean, sem, n, _ = truth
    rows = []
    for l in range(spec.num_layers):
        fwd = cj.forward_flops(truncated(spec, l + 1))
        finite = np.all(np.isfinite(est[:, l]), axis=-1)  # per network
        if not finite.all():
            floor = float(np.mean(np.asarray(sem[:, l], np.float64) ** 2))
            rows.append(
                dict(
                    layer=l,
                    diverged=int((~finite).sum()),
                    resolved=True,
                    excess=float("inf"),
                    excess_se=0.0,
                    mse=float("inf"),
                    noise_floor=floor,
                    output_variance=floor * n,
                    flops=float(fl[l]),
                    forward_flops=float(fwd),
                    ratio=0.0,
                    ratio_low=0.0,
                    ratio_high=0.0,
                )
            )
            continue
        rows.append(dict(layer=l, **compare_to_truth(est[:, l], mean[:, l], sem[:, l], n, fl[l], fwd)))
    return rows


def summarize(rows: list[dict]) -> dict:
    """Fit of log MSE vs log(layer + 1) over resolved finite layers; the first layer sampling
    wins (a diverged layer counts as won by sampling)."""
    res = [r for r in rows if r["resolved"] and not r.get("diverged")]
    fit = fit_power_law([r["layer"] + 1 for r in res], [r["excess"] for r in res])
    loses = [r["layer"] for r in rows if r["resolved"] and r["ratio_high"] < 1]
    diverged = [r["layer"] for r in rows if r.get("diverged")]
    return dict(
        fit=dict(fit, layers=[r["layer"] for r in res]),
        first_layer_sampling_wins=loses[0] if loses else None,
        deepest_resolved=res[-1]["layer"] if res else None,
        first_layer_diverged=diverged[0] if diverged else None,
    )


def truncation_cost(bounded, exact, truth_mean, exact_rows) -> list[dict]:
    """Per layer, what dropping rank blocks costs, paired on the same networks and ground truth:
    ``delta`` = mean over networks and coordinates of ``(t - g)^2 - (e - g)^2`` (``t`` bounded,
    ``e`` exact, ``g`` the ground truth; the truth's noise cancels in expectation, so no floor is
    subtracted), ``delta_se`` its standard error across networks, and ``rel`` = ``delta`` over the
    exact estimator's excess MSE at that layer (issue 12 asks for ``rel`` < 0.1)."""
    t, e, g = (np.asarray(a, np.float64) for a in (bounded, exact, truth_mean))  # (B, L, n)
    d = np.mean((t - g) ** 2 - (e - g) ** 2, axis=-1)  # (B, L)
    B = d.shape[0]
    out = []
    for l, row in enumerate(exact_rows):
        delta = float(d[:, l].mean())
        se = float(np.std(d[:, l], ddof=1) / np.sqrt(B)) if B > 1 else float("nan")
        ex = row["excess"] if row["resolved"] else float("nan")  # unresolved: no reference MSE
        out.append(dict(layer=l, delta=delta, delta_se=se, exact_excess=ex, rel=delta / ex))
    return out


def add_truncation_costs(cfg, store, est_store, w: int, truth) -> None:
    """Give every bounded-rank variant whose exact counterpart ran at width ``w`` its
    :func:`truncation_cost` (entry key ``truncation``), and print them."""
    for config in variants(cfg):
        if config.rank_layers is None:
            continue
        key, exact_key = f"n{w}/{config.name}", f"n{w}/{dataclasses.replace(config, rank_layers=None).name}"
        r, ex = store.entries.get(key), store.entries.get(exact_key)
        eb, ee = est_store.entries.get(key), est_store.entries.get(exact_key)
        if not all(x is not None and x.get("status") == "ok" for x in (r, ex, eb, ee)):
            continue
        arr = lambda x: np.asarray(x["estimates"], np.float64)  # noqa: E731  (None -> nan where diverged)
        cost = truncation_cost(arr(eb), arr(ee), truth[0], ex["layers"])
        store.put(key, dict(r, truncation=cost))
        print(
            f"  {r['estimator']:<24}MSE change vs exact (rel. to exact): "
            + " ".join(f"{c['delta']:.1e}({c['rel']:+.0%})" for c in cost),
            flush=True,
        )


def run(cfg, args) -> dict:
    name = f"mse_vs_depth_{cfg['name']}"
    store = ResultStore(os.path.join(args.out, f"{name}.json"), meta=cfg)
    est_store = mvf.estimates_store(os.path.join(args.out, f"{name}_estimates.json"), cfg)
    cache = os.path.join(args.out, "gt_cache")
    print(f"device: {jax.devices()[0]}  config: {cfg['name']}")
    for w in args.widths or cfg["widths"]:
        spec = mvf.make_spec(w, int(cfg["layers"]), cfg["activation"], mvf.init_of(cfg))
        params = mvf.networks(cfg, spec)
        truth = mvf.truth_for(cfg, spec, params, cache, not args.no_progress, layers=range(spec.num_layers))
        floors = np.mean(truth[1].astype(np.float64) ** 2, axis=(0, 2))
        if store.entries.get(f"n{w}/truth", {}).get("num_samples") != truth[2]:
            store.put(f"n{w}/truth", dict(num_samples=truth[2], seconds=truth[3], noise_floor=floors.tolist()))
        print(
            f"\nwidth {w}: ground truth {truth[2]:.3g} samples x {cfg['networks']} networks, noise floor "
            f"{floors[0]:.2e} (pre0) .. {floors[-1]:.2e} (pre{spec.num_layers - 1})"
        )
        for config in variants(cfg):
            key = f"n{w}/{config.name}"
            old = store.entries.get(key)
            if args.only and not re.search(args.only, key):
                if old is not None:
                    print_row(old)
                continue
            if old is not None and old.get("status") == "ok" and not (args.redo and re.search(args.redo, key)):
                print_row(old)
                continue
            reason = excluded(cfg, w, config.name)
            if reason:
                store.put(key, dict(estimator=config.name, width=w, status="skipped", reason=reason))
                print_row(store[key])
                continue
            r = est_store.entries.get(key)
            if r is None or r.get("status") != "ok" or (args.redo and re.search(args.redo, key)):
                r = mvf.run_variant(
                    cfg, spec, params, config, (est_store, f"{key}#partial"), estimate=layer_means, nonfinite_ok=True
                )
                if r["status"] == "ok":
                    est = np.where(np.isfinite(r["estimates"]), r["estimates"], None)  # JSON null where diverged
                    r = dict(r, estimates=est.tolist(), layer_flops=layer_flops(cfg, spec, params, config))
                est_store.put(key, r)
            if r["status"] != "ok":
                store.put(key, dict(estimator=config.name, width=w, **r))
            else:
                rows = score(cfg, spec, np.asarray(r["estimates"], np.float64), truth, r["layer_flops"])
                store.put(
                    key,
                    dict(
                        estimator=config.name,
                        width=w,
                        status="ok",
                        run_s=r["run_s"],
                        compile_s=r["compile_s"],
                        layers=rows,
                        **summarize(rows),
                    ),
                )
            print_row(store[key])
        add_truncation_costs(cfg, store, est_store, w, truth)
    plot(store, cfg, os.path.join(args.out, f"{name}.png"))
    print(f"\nwrote {store.path} and {name}.png")
    return store.data


def print_row(r: dict) -> None:
    head = f"  {r['estimator']:<24}"
    if r.get("status") != "ok":
        print(head + f"{r['status']}: {r['reason'][:100]}", flush=True)
        return
    cells = []
    for q in r["layers"]:
        if q.get("diverged"):
            cells.append(f"nan({q['diverged']})")  # networks whose estimate is not finite
        else:
            cells.append(f"{q['excess']:.1e}" if q["resolved"] else f"<{q['mse_upper']:.0e}")
    f, lose = r["fit"], r["first_layer_sampling_wins"]
    print(head + " ".join(cells), flush=True)
    print(
        " " * 26 + f"slope vs layer+1 {f['slope']:.2f} +- {f['stderr']:.2f}; sampling wins from layer "
        f"{lose if lose is not None else '-'}; ratio per layer: "
        + " ".join(f"{q['ratio']:.2g}" if q["resolved"] else f">{q['ratio_lower']:.2g}" for q in r["layers"]),
        flush=True,
    )


def plot(store: ResultStore, cfg: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = [w for w in cfg["widths"] if f"n{w}/truth" in store.entries]
    if not widths:
        return
    fig, axes = plt.subplots(2, len(widths), figsize=(5.5 * len(widths), 8.5), squeeze=False)
    for col, w in enumerate(widths):
        top, bottom = axes[0][col], axes[1][col]
        floors = store.entries.get(f"n{w}/truth", {}).get("noise_floor")
        if floors:
            top.plot(range(len(floors)), floors, "k:", label="ground-truth noise floor")
        for i, config in enumerate(variants(cfg)):
            r = store.entries.get(f"n{w}/{config.name}")
            if not r or r.get("status") != "ok":
                continue
            c, ls = f"C{i % 10}", "--" if config.avg_metric else "-"
            res = [q for q in r["layers"] if q["resolved"] and not q.get("diverged")]
            up = [q for q in r["layers"] if not q["resolved"]]
            top.errorbar(
                [q["layer"] for q in res],
                [q["excess"] for q in res],
                yerr=[q["excess_se"] for q in res],
                fmt="o" + ls,
                color=c,
                capsize=2,
                ms=3,
                label=config.name,
            )
            top.plot([q["layer"] for q in up], [q["mse_upper"] for q in up], "v", color=c, ms=4, alpha=0.6)
            bottom.plot(
                [q["layer"] for q in res], [q["ratio"] for q in res], "o" + ls, color=c, ms=3, label=config.name
            )
            bottom.plot([q["layer"] for q in up], [q["ratio_lower"] for q in up], "^", color=c, ms=4, alpha=0.6)
        top.set_yscale("log")
        top.set_title(f"width {w}: MSE of E[pre_l] (v: upper bounds)")
        top.set_xlabel("layer l")
        bottom.set_yscale("log")
        bottom.axhline(1.0, color="k", lw=0.8)
        bottom.set_title("MC FLOPs to match / estimator FLOPs (^: lower bounds)")
        bottom.set_xlabel("layer l")
        for ax in (top, bottom):
            ax.grid(True, which="both", alpha=0.3)
        top.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=100)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "mse_vs_depth_smoke.json")
    )
    p.add_argument("--out", default="results")
    p.add_argument("--redo", default=None, help="regex: recompute the variants whose key (n<width>/<name>) matches")
    p.add_argument("--only", default=None, help="regex: run now only the variants whose key (n<width>/<name>) matches")
    p.add_argument(
        "--widths",
        default=None,
        help="comma-separated subset of the config's widths to run now (the rest keep their rows)",
    )
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    check_config(cfg)
    if args.widths:
        args.widths = [int(w) for w in args.widths.split(",")]
        if not set(args.widths) <= set(cfg["widths"]):
            raise ValueError(f"--widths {args.widths} must be among the config's widths {cfg['widths']}")
    enable_x64()  # float64 accumulation; arrays carry explicit dtypes
    return run(cfg, args)


if __name__ == "__main__":
    main()
