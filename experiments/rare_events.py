"""Rare-event probabilities P(z_i > t) of a late ReLU layer: cumulant propagation vs Monte Carlo
at equal FLOPs, against an importance-sampled ground truth.

Network (as in the paper's LPE preset): He-initialised ReLU MLP without biases on N(0, I); z =
pre{layer}. Thresholds per neuron: t = mean_i + s * sd_i (sample moments of z) for each s in
``sigmas``, or the same absolute thresholds t for every neuron (``thresholds``; the authors'
setting is t = 3, a heaviside after a bias of -3). Each estimator computes every threshold and
neuron in one vmapped run (the thresholded network of :mod:`cumjax.tails`); its FLOPs (analytic
jaxpr count) buy Monte Carlo N = FLOPs / (forward pass to z + comparisons) samples, run on the
same thresholds.

Ground truth on ``truth_neurons`` neurons: :func:`cumjax.importance.tail_importance_sampling`
(defensive-mixture mean-shift IS with radial integration; standard errors from the weighted
samples), checked against ``validate_samples`` plain samples wherever those see >= 30 events.

    python experiments/rare_events.py --config configs/rare_events_full.json --out results/

Writes ``<out>/rare_events_<name>.json`` (every unit of work saved atomically; reruns resume, also
after estimators are added to the config) and
``<out>/rare_events_<name>.png`` (relative error vs probability).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
from common import ResultStore, enable_x64, load_config, network, save_figure_atomic, time_compiled
from tqdm import tqdm

import cumjax as cj
from cumjax import importance, tails

REQUIRED = (
    "width",
    "layer",
    "seed",
    "estimators",
    "truth_neurons",
    "moment_samples",
    "is_samples",
    "validate_samples",
)


def check_config(cfg: dict) -> None:
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"config is missing {missing}")
    if not (isinstance(cfg["layer"], int) and cfg["layer"] >= 1):
        raise ValueError("layer must be an int >= 1 (z = pre{layer} after `layer` ReLU layers)")
    if not 1 <= cfg["truth_neurons"] <= cfg["width"]:
        raise ValueError("truth_neurons must lie in [1, width]")
    if ("sigmas" in cfg) == ("thresholds" in cfg):
        raise ValueError("give exactly one of sigmas (t = mean + s sd per neuron) and thresholds (absolute t)")
    levels = cfg.get("sigmas", cfg.get("thresholds"))
    if not levels or sorted(levels) != list(levels):
        raise ValueError(f"{level_name(cfg)}s must be a non-empty increasing list")
    for e in cfg["estimators"]:
        cj.PropagationConfig(**e)  # validates k_max and kind


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "rare_events_smoke.json")
    )
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    check_config(cfg)
    enable_x64()  # float64 sums and estimates; sampling forward in float32
    name = cfg["name"]
    # Estimators are stored one by one under their own names, so adding one to the list keeps the
    # moments, ground truth and validation already computed (any other change starts over).
    store = ResultStore(
        os.path.join(args.out, f"{name}.json"), meta={k: v for k, v in cfg.items() if k != "estimators"}
    )
    n, layer = cfg["width"], cfg["layer"]
    spec, params = network(cfg["seed"], n, layer + 1, "relu", dtype=jnp.float64)
    g = cj.Gaussian.standard(n, jnp.float64)
    chunk = cfg.get("chunk", 4096)
    levels = np.asarray(cfg.get("sigmas", cfg.get("thresholds")), float)
    truth_idx = np.arange(cfg["truth_neurons"])  # the network is random: the first m neurons are a random sample
    key = jax.random.PRNGKey(cfg["seed"] + 1)
    k_mom, k_is, k_val, k_mc = jax.random.split(key, 4)

    def moments():
        mc = cj.monte_carlo(k_mom, params, spec, g, int(cfg["moment_samples"]), chunk_size=chunk)
        z = f"pre{layer}"
        sd = np.asarray(mc.sem[z]) * np.sqrt(mc.num_samples)
        return dict(mean=np.asarray(mc.mean[z]).tolist(), sd=sd.tolist())

    mom = store.get_or_compute("moments", moments)
    if "sigmas" in cfg:
        thresholds = np.asarray(mom["mean"])[None] + levels[:, None] * np.asarray(mom["sd"])[None]  # (T, n)
    else:
        thresholds = np.broadcast_to(levels[:, None], (len(levels), n)).copy()
    per_sample = tails.sample_flops(spec, layer, len(levels))

    # --- cumulant estimates, their FLOPs, and Monte Carlo with the same FLOPs
    for e in tqdm(cfg["estimators"], desc="estimators"):
        conf = cj.PropagationConfig(**e)

        def run(conf=conf):
            r = time_compiled(
                lambda p, t: tails.tail_probabilities(p, spec, g, layer, t, conf), params, jnp.asarray(thresholds)
            )
            flops = tails.tail_flops(params, spec, g, layer, thresholds, conf)
            budget = max(2, int(flops["analytic"] // per_sample))
            mc = tails.tail_monte_carlo(
                jax.random.fold_in(k_mc, e["k_max"] * 10 + len(e["kind"])),
                params,
                spec,
                g,
                layer,
                thresholds,
                budget,
                chunk_size=chunk,
            )
            return dict(
                estimate=np.asarray(r["out"]).tolist(),
                flops=flops["analytic"],
                flops_xla=flops["xla"],
                run_s=r["run_s"],
                compile_s=r["compile_s"],
                mc_samples=budget,
                mc_estimate=mc.mean.tolist(),
            )

        try:
            store.get_or_compute(f"est_{conf.name}", run)
        except MemoryError as err:  # the memory guard, before any work: not stored, a rerun retries it
            tqdm.write(f"{conf.name}: not run now: {err}")

    # --- ground truth: importance sampling, one neuron at a time (resumable)
    for i in tqdm(truth_idx, desc="importance sampling"):

        def truth(i=int(i)):
            est, shifts = importance.tail_importance_sampling(
                jax.random.fold_in(k_is, i),
                params,
                spec,
                g,
                layer,
                [i] * len(levels),
                thresholds[:, i],
                int(cfg["is_samples"]),
                chunk_size=chunk,
                **cfg.get("is_options", {}),
            )
            return dict(p=est.mean.tolist(), sem=est.sem.tolist(), shift_norm=np.linalg.norm(shifts, axis=1).tolist())

        store.get_or_compute(f"truth_n{int(i)}", truth)

    def validate():
        mc = tails.tail_monte_carlo(
            k_val, params, spec, g, layer, thresholds, int(cfg["validate_samples"]), chunk_size=chunk
        )
        return dict(p=mc.mean[:, truth_idx].tolist(), sem=mc.sem[:, truth_idx].tolist())

    val = store.get_or_compute("validation", validate)
    results = summarise(cfg, store, levels, truth_idx, val, per_sample)
    store.data["summary"] = results
    store.put("done", True)
    plot(results, os.path.join(args.out, f"{name}.png"))
    print_table(results)
    return store.data


def level_name(cfg) -> str:
    """How the config gives its thresholds: ``sigma`` (mean + s sd per neuron) or ``threshold``."""
    return "sigma" if "sigmas" in cfg else "threshold"


def per_decade(est, truth, truth_se, max_truth_rel_se: float = 0.3) -> list[dict]:
    """Median relative error over the (threshold, neuron) pairs whose true probability lies in each
    decade [10^-(j+1), 10^-j): with absolute thresholds one threshold spans many decades across
    neurons, so per-threshold medians mix them. Only pairs whose ground truth has a relative
    standard error under ``max_truth_rel_se`` count."""
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_se = truth_se / truth
        ok = (truth > 0) & np.isfinite(rel_se) & (rel_se < max_truth_rel_se)
        signed = (est - truth) / truth
    rel = np.abs(signed)
    out = []
    for j in range(1, 13):
        lo, hi = 10.0 ** -(j + 1), 10.0**-j
        sel = ok & (truth >= lo) & (truth < hi)
        if sel.sum() >= 3:
            out.append(
                dict(
                    p_low=lo,
                    p_high=hi,
                    pairs=int(sel.sum()),
                    rel_err_median=float(np.median(rel[sel])),
                    signed_rel_err_median=float(np.median(signed[sel])),
                )
            )
    return out


def summarise(cfg, store, levels, truth_idx, val, per_sample) -> dict:
    truth = np.array([store[f"truth_n{int(i)}"]["p"] for i in truth_idx]).T  # (T, m)
    truth_se = np.array([store[f"truth_n{int(i)}"]["sem"] for i in truth_idx]).T
    vp, vse = np.asarray(val["p"]), np.asarray(val["sem"])
    ok = vp * cfg["validate_samples"] >= 30  # enough plain events for a normal approximation
    zval = (truth - vp) / np.sqrt(truth_se**2 + vse**2)
    validation = dict(
        samples=cfg["validate_samples"],
        compared=int(ok.sum()),
        mean_z=float(zval[ok].mean()) if ok.any() else None,
        mean_z2=float((zval[ok] ** 2).mean()) if ok.any() else None,
        max_abs_z=float(np.abs(zval[ok]).max()) if ok.any() else None,
        per_sigma_compared=ok.sum(1).tolist(),
    )
    rows = []
    for e in cfg["estimators"]:
        name = cj.PropagationConfig(**e).name
        if f"est_{name}" not in store:  # refused by the memory guard this time
            continue
        r = store[f"est_{name}"]
        est = np.asarray(r["estimate"])[:, truth_idx]
        mc = np.asarray(r["mc_estimate"])[:, truth_idx]
        N = r["mc_samples"]
        rel = np.abs(est - truth) / truth
        rel_mc = np.abs(mc - truth) / truth
        per_sigma = []
        for j, s in enumerate(levels):
            p = float(np.median(truth[j]))
            per_sigma.append(
                dict(
                    **{level_name(cfg): float(s)},
                    p_median=p,
                    p_min=float(truth[j].min()),
                    p_max=float(truth[j].max()),
                    truth_rel_se=float(np.median(truth_se[j] / truth[j])),
                    rel_err_median=float(np.median(rel[j])),
                    signed_rel_err_median=float(np.median((est[j] - truth[j]) / truth[j])),
                    rel_err_rms=float(np.sqrt(np.mean(rel[j] ** 2))),
                    mc_rel_err_expected=float(np.median(np.sqrt((1 - truth[j]) / (N * truth[j])))),
                    mc_rel_err_median=float(np.median(rel_mc[j])),
                    mc_zero_fraction=float(np.mean(mc[j] == 0)),
                    mc_expected_events=float(N * p),
                    mc_p_zero_events=float(np.exp(N * np.log1p(-p))),
                )
            )
        useful = [row for row in per_sigma if row["rel_err_median"] < 0.3]
        within2 = [row for row in per_sigma if row["rel_err_median"] < 0.5]
        decades = per_decade(est, truth, truth_se)
        rows.append(
            dict(
                estimator=name,
                flops=r["flops"],
                flops_xla=r["flops_xla"],
                run_s=r["run_s"],
                compile_s=r["compile_s"],
                mc_samples=N,
                mc_resolvable_p=1.0 / N,
                smallest_p_under_30pct=min((u["p_median"] for u in useful), default=None),
                smallest_p_under_50pct=min((u["p_median"] for u in within2), default=None),
                per_sigma=per_sigma,
                per_decade=decades,
                smallest_decade_under_30pct=min(
                    (d["p_low"] for d in decades if d["rel_err_median"] < 0.3), default=None
                ),
            )
        )
    for row in rows:
        s = row["smallest_decade_under_30pct"]
        row["resolution_gain_decades"] = None if s is None else row["mc_resolvable_p"] / s
        s = row["smallest_p_under_30pct"]
        row["resolution_gain"] = None if s is None else row["mc_resolvable_p"] / s  # >1: beyond sampling's reach
        s2 = row["smallest_p_under_50pct"]
        row["resolution_gain_50pct"] = None if s2 is None else row["mc_resolvable_p"] / s2
    return dict(
        validation=validation, sample_flops=per_sample, rows=rows, truth_p=truth.tolist(), truth_sem=truth_se.tolist()
    )


def plot(results, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for c, row in zip(colors * 3, results["rows"]):
        ps = [r["p_median"] for r in row["per_sigma"]]
        ax.loglog(
            ps,
            [max(r["rel_err_median"], 1e-4) for r in row["per_sigma"]],
            "o-",
            color=c,
            label=f"{row['estimator']} ({row['flops']:.2g} FLOPs)",
        )
        ax.loglog(ps, [r["mc_rel_err_expected"] for r in row["per_sigma"]], ":", color=c, alpha=0.8)
        ax.axvline(row["mc_resolvable_p"], color=c, lw=0.6, ls="--", alpha=0.5)
    truth_se = [
        np.median(np.asarray(results["truth_sem"])[j] / np.asarray(results["truth_p"])[j])
        for j in range(len(results["truth_p"]))
    ]
    ps = [np.median(p) for p in results["truth_p"]]
    ax.loglog(ps, truth_se, "k--", lw=1, label="ground truth rel. SE (IS)")
    ax.axhline(0.3, color="gray", lw=0.8)
    ax.set_ylim(1e-3, 1e3)
    ax.set_xlabel("tail probability P(z_i > t) (median over neurons)")
    ax.set_ylabel("median relative error")
    ax.set_title(
        "cumulant estimate (solid) vs Monte Carlo at equal FLOPs (dotted: expected;\n"
        "dashed vertical: 1 / MC samples, below it MC typically sees no event)",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    ax.invert_xaxis()
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)


def print_table(results) -> None:
    v = results["validation"]
    print(
        f"\nIS vs plain MC ({v['samples']:.3g} samples) on {v['compared']} resolvable (neuron, threshold) pairs: "
        f"mean z {v['mean_z']}, mean z^2 {v['mean_z2']}, max |z| {v['max_abs_z']}"
    )
    for row in results["rows"]:
        print(
            f"\n{row['estimator']}: {row['flops']:.3g} FLOPs -> Monte Carlo {row['mc_samples']} samples "
            f"(resolves p ~ {row['mc_resolvable_p']:.2g}); smallest p with median rel. err < 30%: "
            f"{row['smallest_p_under_30pct']}, < 50%: {row['smallest_p_under_50pct']}"
        )
        print(
            "  by decade of the true p: "
            + ", ".join(
                f"[{d['p_low']:.0e}, {d['p_high']:.0e}) {d['rel_err_median']:.2f} ({d['pairs']})"
                for d in row["per_decade"]
            )
        )
        print(f"{'level':>6}{'p':>10}{'rel err':>9}{'signed':>9}{'MC expected':>13}{'MC realised':>13}{'MC zero':>9}")
        for r in row["per_sigma"]:
            print(
                f"{r.get('sigma', r.get('threshold')):>6.2f}{r['p_median']:>10.2e}{r['rel_err_median']:>9.3f}"
                f"{r['signed_rel_err_median']:>+9.3f}{r['mc_rel_err_expected']:>13.3g}"
                f"{r['mc_rel_err_median']:>13.3f}{r['mc_zero_fraction']:>9.2f}"
            )


if __name__ == "__main__":
    main()
