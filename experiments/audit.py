"""Auditing a network through the estimator: minimal weight perturbation that makes a rare event
likely, per-weight sensitivity maps, and estimator gradients vs Monte Carlo gradients.

Network: He-initialised ReLU MLP without biases on N(0, I), ``layer`` ReLU layers; z = pre{layer}
is its output.

(a) Search: threshold ``t = mean_j + sigma * sd_j`` on neuron ``neuron``; find the smallest
    relative Frobenius perturbation of the kernels that lifts the *estimated* P(z_j > t) to
    ``target_factor`` times its value, with optax on the estimator's gradients
    only (:func:`cumjax.audit.minimal_perturbation`); then check the perturbed network by
    importance sampling and plain Monte Carlo.
(b) Sensitivity maps: d E[z_j] / d W_l and d P(z_j > t) / d W_l through the estimator (heatmaps).
(c) Gradient check: d E[z_j] / d params from each estimator vs the pathwise Monte Carlo gradient
    (mean of per-sample gradients, standard errors from their spread): z-scores on every
    coordinate, and Hotelling's T^2 (full sample covariance) on ``probe`` random coordinates;
    ``equivalent_mc_samples`` = N K / (T^2 - K): the sample count at which the estimator's gradient
    bias would equal Monte Carlo's noise (None: no bias detectable with N samples).

    python experiments/audit.py --config configs/audit_full.json --out results/

Writes ``<out>/<name>.json`` (resumable) and ``<out>/<name>_{search,sensitivity,gradients}.png``.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
from common import ResultStore, enable_x64, load_config, network, save_figure_atomic, timed
from jax.flatten_util import ravel_pytree
from tqdm import tqdm

import cumjax as cj
from cumjax import audit, importance, tails

REQUIRED = (
    "width",
    "layer",
    "seed",
    "neuron",
    "sigma",
    "target_factor",
    "search_estimator",
    "search",
    "is_samples",
    "verify_samples",
    "gradient_estimators",
    "gradient_samples",
    "probe",
)


def check_config(cfg: dict) -> None:
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"config is missing {missing}")
    if not 0 <= cfg["neuron"] < cfg["width"] or cfg["layer"] < 1 or cfg["target_factor"] <= 1:
        raise ValueError("need 0 <= neuron < width, layer >= 1 and target_factor > 1")
    for e in cfg["gradient_estimators"] + [cfg["search_estimator"]]:
        cj.PropagationConfig(**e)  # validates k_max and kind


def _imshow_grid(axes, mats, title, column):
    for l, (ax, m) in enumerate(zip(axes, mats)):
        m = np.asarray(m)
        last = l == len(mats) - 1  # only the output's own column of the last kernel can matter
        m = m[:, [column]] if last else m
        lim = float(np.abs(m).max()) or 1.0
        im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_title(f"{title}: W{l}" + (f"[:, {column}]" if last else ""), fontsize=8)
        ax.set_xlabel("out", fontsize=7)
        ax.set_ylabel("in", fontsize=7)
        ax.figure.colorbar(im, ax=ax, fraction=0.046)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "audit_smoke.json"))
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    check_config(cfg)
    enable_x64()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name, n, layer, j = cfg["name"], cfg["width"], cfg["layer"], cfg["neuron"]
    store = ResultStore(os.path.join(args.out, f"{name}.json"), meta=cfg)
    spec, params = network(cfg["seed"], n, layer + 1, "relu", dtype=jnp.float64)
    g = cj.Gaussian.standard(n, jnp.float64)
    kernels = [W for W, _ in cj.layer_weights(params)]
    keys = jax.random.split(jax.random.PRNGKey(cfg["seed"] + 7), 6)
    chunk = cfg.get("chunk", 4096)
    is_opts = cfg.get("is_options", {})

    def moments():
        mc = cj.monte_carlo(keys[0], params, spec, g, int(cfg.get("moment_samples", 65536)), chunk_size=chunk)
        z = f"pre{layer}"
        return dict(mean=float(mc.mean[z][j]), sd=float(mc.sem[z][j] * np.sqrt(mc.num_samples)))

    mom = store.get_or_compute("moments", moments)
    t = mom["mean"] + cfg["sigma"] * mom["sd"]
    conf = cj.PropagationConfig(**cfg["search_estimator"])

    @jax.jit
    def tail(kern):
        p = audit.replace_kernels(params, kern)
        return tails.tail_probabilities(p, spec, g, layer, jnp.asarray([t]), conf, neurons=[j])[0, 0]

    def sampled(kern, key):
        p = audit.replace_kernels(params, kern)
        est, _ = importance.tail_importance_sampling(
            key, p, spec, g, layer, [j], [t], int(cfg["is_samples"]), chunk_size=chunk, **is_opts
        )
        mc = tails.tail_monte_carlo(
            jax.random.fold_in(key, 1),
            p,
            spec,
            g,
            layer,
            jnp.full((1, n), t),
            int(cfg["verify_samples"]),
            chunk_size=chunk,
        )
        return dict(
            is_p=float(est.mean[0]), is_sem=float(est.sem[0]), mc_p=float(mc.mean[0, j]), mc_sem=float(mc.sem[0, j])
        )

    # --- (a) minimal perturbation through the estimator, verified by sampling
    def search():
        before = sampled(kernels, keys[1])
        estimate_before = float(tail(kernels))
        if not estimate_before > 0:
            raise ValueError(f"the {conf.name} estimate at this threshold is {estimate_before}: pick a smaller sigma")
        target = cfg["target_factor"] * estimate_before
        res, search_s = timed(lambda: audit.minimal_perturbation(tail, kernels, target, **cfg["search"]))
        after = sampled(res.kernels, keys[2])
        per_layer = [float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) for a, b in zip(res.kernels, kernels)]
        return dict(
            threshold=t,
            estimate_before=estimate_before,
            before=before,
            target=target,
            relative_norm=res.relative_norm,
            per_layer_relative_norm=per_layer,
            estimate_after=res.value,
            after=after,
            line_search_scale=res.scale,
            search_s=search_s,
            history=res.history,
            after_minus_target_in_se=(after["is_p"] - target) / after["is_sem"],
        )

    s = store.get_or_compute("search", search)
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    h = np.asarray(s["history"])
    ax[0].plot(h[:, 0], h[:, 1], ".-", ms=2)
    ax[0].axhline(s["target"], color="k", ls="--", lw=0.8, label="target")
    ax[0].set_xlabel("relative Frobenius norm of the perturbation")
    ax[0].set_ylabel(f"estimated P(z_{j} > t) ({conf.name})")
    ax[0].set_yscale("log")
    ax[0].legend(fontsize=8)
    ax[0].set_title("optax search path (estimator gradients only)", fontsize=9)
    labels = ["before", "after"]
    for k, (key, lab) in enumerate([("is", "importance sampling"), ("mc", "plain Monte Carlo")]):
        vals = [s["before"][f"{key}_p"], s["after"][f"{key}_p"]]
        errs = [2 * s["before"][f"{key}_sem"], 2 * s["after"][f"{key}_sem"]]
        ax[1].errorbar(np.arange(2) + 0.1 * k, vals, yerr=errs, fmt="o", capsize=3, label=f"{lab} (±2 SE)")
    ax[1].plot([0, 1], [s["estimate_before"], s["estimate_after"]], "x", color="k", ms=8, label="estimate")
    ax[1].axhline(s["target"], color="k", ls="--", lw=0.8)
    ax[1].set_xticks([0, 1], labels)
    ax[1].set_yscale("log")
    ax[1].legend(fontsize=7)
    ax[1].set_title(f"relative perturbation {s['relative_norm']:.3g}", fontsize=9)
    fig.tight_layout()
    save_figure_atomic(fig, os.path.join(args.out, f"{name}_search.png"), dpi=110)

    if "gradient_check" not in store:  # (b) and (c) together: a rerun after both is free
        # --- (b) sensitivity maps through the estimator
        grad_conf = cj.PropagationConfig(**cfg["gradient_estimators"][-1])
        onehot = jnp.zeros(n).at[j].set(1.0)
        g_mean = audit.estimate_gradient(params, spec, g, grad_conf, onehot)
        g_tail = jax.jit(jax.grad(tail))(kernels)
        fig, axes = plt.subplots(2, layer + 1, figsize=(3.4 * (layer + 1), 6.2))
        _imshow_grid(axes[0], [W for W, _ in cj.layer_weights(g_mean)], f"dE[z_{j}]/dW", j)
        _imshow_grid(axes[1], g_tail, f"dP(z_{j}>t)/dW", j)
        fig.suptitle(f"sensitivity maps through the estimator ({grad_conf.name} / {conf.name})", fontsize=10)
        fig.tight_layout()
        save_figure_atomic(fig, os.path.join(args.out, f"{name}_sensitivity.png"), dpi=100)
        sens = dict(
            mean_grad_norm=[float(jnp.linalg.norm(W)) for W, _ in cj.layer_weights(g_mean)],
            tail_grad_norm=[float(jnp.linalg.norm(g)) for g in g_tail],
            tail_grad_top_layer_entries=int(np.argmax([float(jnp.abs(g).max()) for g in g_tail])),
        )
        store.put("sensitivity", sens)

        # --- (c) estimator gradients vs pathwise Monte Carlo gradients
        # probe coordinates among those that can move E[z_j] (the other output columns cannot)
        candidates = np.flatnonzero(np.asarray(ravel_pytree(g_mean)[0]))
        probe = np.sort(np.asarray(jax.random.choice(keys[3], candidates, (cfg["probe"],), replace=False)))

        def mc_gradient():
            pg = audit.pathwise_gradient(
                keys[4],
                params,
                spec,
                g,
                onehot,
                int(cfg["gradient_samples"]),
                probe,
                chunk_size=cfg.get("gradient_chunk", 1024),
            )
            flat = lambda tree: np.asarray(ravel_pytree(tree)[0]).tolist()  # noqa: E731
            return dict(
                probe=probe.tolist(),
                mean=flat(pg.mean),
                sem=flat(pg.sem),
                probe_cov=pg.probe_cov.tolist(),
                num_samples=pg.num_samples,
            )

        mcg = store.get_or_compute("mc_gradient", mc_gradient)
        probe = np.asarray(mcg["probe"])
        g_mc, se_mc = np.asarray(mcg["mean"]), np.asarray(mcg["sem"])
        live = se_mc > 1e-9 * np.abs(g_mc).max()  # a constant per-sample gradient (other outputs: 0) has no z
        rows, grads = {}, {}
        for e in tqdm(cfg["gradient_estimators"], desc="gradient check"):
            c = cj.PropagationConfig(**e)
            est = np.asarray(ravel_pytree(audit.estimate_gradient(params, spec, g, c, onehot))[0])
            grads[c.name] = est
            z = (est[live] - g_mc[live]) / se_mc[live]
            ht = audit.hotelling_test(est[probe], g_mc[probe], mcg["probe_cov"], mcg["num_samples"])
            excess = ht["t2"] - ht["dof"]  # E[T^2] = K N/(N-K-2) ~ K without bias; the excess measures bias^2 * N
            equivalent = float(mcg["num_samples"] * ht["dof"] / excess) if excess > 0 else None
            rows[c.name] = dict(
                equivalent_mc_samples=equivalent,
                mean_z=float(z.mean()),
                mean_z2=float((z**2).mean()),
                frac_abs_z_gt_3=float(np.mean(np.abs(z) > 3)),
                coordinates=int(live.sum()),
                hotelling=ht,
                rel_bias_rms=float(np.sqrt(np.mean((est - g_mc) ** 2)) / np.sqrt(np.mean(g_mc**2))),
                estimate_probe=est[probe].tolist(),
            )
        store.put("gradient_check", rows)
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        for nm, r in rows.items():
            ax[0].errorbar(
                g_mc[probe],
                r["estimate_probe"],
                xerr=2 * se_mc[probe],
                fmt="o",
                ms=3,
                capsize=2,
                label=f"{nm}: Hotelling p={r['hotelling']['p_value']:.2g}",
            )
        lo, hi = float(g_mc[probe].min()), float(g_mc[probe].max())
        ax[0].plot([lo, hi], [lo, hi], "k-", lw=0.6)
        ax[0].set_xlabel("Monte Carlo gradient (±2 SE)")
        ax[0].set_ylabel("estimator gradient")
        ax[0].legend(fontsize=7)
        ax[0].set_title(f"{cfg['probe']} random coordinates of dE[z_{j}]/dparams", fontsize=9)
        bins = np.linspace(-6, 6, 61)
        for nm, est in grads.items():
            z = np.clip((est[live] - g_mc[live]) / se_mc[live], -6, 6)
            ax[1].hist(z, bins=bins, density=True, histtype="step", label=nm)
        xs = np.linspace(-6, 6, 200)
        ax[1].plot(xs, np.exp(-(xs**2) / 2) / np.sqrt(2 * np.pi), "k--", lw=1, label="N(0, 1)")
        ax[1].set_xlabel("z = (estimate - MC) / SE, every weight")
        ax[1].legend(fontsize=7)
        fig.tight_layout()
        save_figure_atomic(fig, os.path.join(args.out, f"{name}_gradients.png"), dpi=110)
    store.put("done", True)
    print(
        f"\n(a) P(z_{j} > {t:.3g}): IS {s['before']['is_p']:.3g} ± {s['before']['is_sem']:.2g} (estimate "
        f"{s['estimate_before']:.3g}) -> target {s['target']:.3g}; relative perturbation {s['relative_norm']:.4f}; "
        f"after: estimate {s['estimate_after']:.3g}, IS {s['after']['is_p']:.3g} ± {s['after']['is_sem']:.2g}, "
        f"MC {s['after']['mc_p']:.3g} ± {s['after']['mc_sem']:.2g}"
    )
    sens, rows = store["sensitivity"], store["gradient_check"]
    print(f"(b) gradient norms per layer: mean {sens['mean_grad_norm']}, tail {sens['tail_grad_norm']}")
    print(f"(c) estimator vs pathwise MC gradients ({cfg['gradient_samples']} samples):")
    for nm, r in rows.items():
        ht = r["hotelling"]
        print(
            f"  {nm:>14}: mean z {r['mean_z']:+.3f}  mean z^2 {r['mean_z2']:.3f}  |z|>3 {r['frac_abs_z_gt_3']:.4f}  "
            f"Hotelling T2 {ht['t2']:.1f} (K={ht['dof']}, p={ht['p_value']:.3g})  rel. diff {r['rel_bias_rms']:.3g}  "
            f"as accurate as ~{r['equivalent_mc_samples'] or float('inf'):.3g} MC samples"
        )
    return store.data


if __name__ == "__main__":
    main()
