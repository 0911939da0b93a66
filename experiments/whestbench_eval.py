"""cumjax estimators scored by WhestBench beside WhestBench's own baselines.

Bakes (or reuses) a WhestBench dataset with ``whest dataset bake`` (ReLU after every layer, no
biases, ``x @ W``, He weights, ground truth = Monte Carlo layer means), then scores every cumjax
variant (:mod:`cumjax.whest`) and WhestBench's mean- and covariance-propagation baselines with
WhestBench's own scorer (``whestbench.scoring.evaluate_estimator``), one network at a time. Prints
and saves, per estimator: final-layer and all-layer MSE (mean over networks with its standard error,
and with the ground truth's sampling noise subtracted), wall time per network, FLOPs (cumjax: the
analytic count of the program that runs, :func:`cumjax.flopcount.jaxpr_flops`, also charged to
WhestBench's flopscope counter, with XLA's count of the compiled unrolled program beside it;
baselines: an analytic count, and the scorer's flopscope count, which prices float64 at 2x), and
the Monte Carlo FLOPs needed to match the final-layer MSE over the estimator's own FLOPs (the
final-layer predictions the scorer saw, scored by :func:`cumjax.compare_to_truth`; a lower bound
where the MSE is not resolved above the ground truth's noise).

    python experiments/whestbench_eval.py --config configs/whestbench_smoke.json --out results/

Writes ``<out>/whestbench_<name>.json`` after every scored network (a rerun resumes) and
``<out>/whestbench_<name>.png``; the dataset goes to ``<out>/whestbench_<name>/dataset`` unless the
config names one. Needs the ``whest`` extra (``pip install 'cumjax[whest]'``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import warnings

import jax
import numpy as np
from common import (
    ResultStore,
    compare_to_truth,
    enable_x64,
    load_config,
    save_figure_atomic,
    timed,
    write_json_atomic,
)
from tqdm import tqdm

import cumjax as cj
from cumjax import whest as cw

DEFAULTS = dict(
    split="public",
    dtype="float32",
    variance_samples=65536,
    flop_budget=10**15,
    xla_flops=True,
    baselines=["mean_propagation", "covariance_propagation"],
)
PROPAGATION_KEYS = {"k_max", "kind", "factored", "avg_metric"}


def check_config(cfg: dict) -> tuple[dict, list[cj.PropagationConfig]]:
    """Defaults filled in, and the cumjax variants; ValueError on a bad config (before heavy work)."""
    cfg = {**DEFAULTS, **cfg}
    for key in ("width", "depth", "n_mlps", "n_samples"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise ValueError(f"config needs a positive integer {key!r}, got {cfg.get(key)!r}")
    seeds = cfg.get("mlp_seeds")
    if not (
        isinstance(seeds, list)
        and len(seeds) == cfg["n_mlps"]
        and len(set(seeds)) == len(seeds)
        and all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds)
    ):
        raise ValueError(f"config needs 'mlp_seeds': {cfg['n_mlps']} distinct ints in [0, 2^63), got {seeds!r}")
    variants = []
    for v in cfg.get("variants", []):
        extra = set(v) - PROPAGATION_KEYS
        if extra:
            raise ValueError(f"unknown variant keys {sorted(extra)}; allowed: {sorted(PROPAGATION_KEYS)}")
        variants.append(cj.PropagationConfig(**v))  # validates k_max and kind
    if not variants and not cfg["baselines"]:
        raise ValueError("config lists no 'variants' and no 'baselines': nothing to score")
    unknown = set(cfg["baselines"]) - {"mean_propagation", "covariance_propagation"}
    if unknown:
        raise ValueError(f"unknown baselines {sorted(unknown)}")
    if cfg["dtype"] not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, got {cfg['dtype']!r}")
    return cfg, variants


# ----------------------------------------------------------------------------- dataset


def bake(cfg: dict, path: str) -> None:
    """``whest dataset bake`` into ``path`` (through a temporary directory, so an interrupted bake
    leaves nothing that looks finished)."""
    whest = shutil.which("whest", path=os.path.dirname(sys.executable)) or shutil.which("whest")
    if whest is None:
        raise RuntimeError("the 'whest' command was not found; install the extra: pip install 'cumjax[whest]'")
    partial = path + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    seeds_file = path + ".seeds.json"
    write_json_atomic(cfg["mlp_seeds"], seeds_file)
    cmd = [
        whest,
        "dataset",
        "bake",
        "--n-mlps",
        str(cfg["n_mlps"]),
        "--n-samples",
        str(cfg["n_samples"]),
        "--width",
        str(cfg["width"]),
        "--depth",
        str(cfg["depth"]),
        "--mlp-seeds",
        seeds_file,
        "--split",
        cfg["split"],
        "--output",
        partial,
    ]
    print("baking:", " ".join(cmd), flush=True)
    _, secs = timed(lambda: subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL))
    os.replace(partial, path)
    print(f"baked {path} in {secs:.0f} s", flush=True)


def load_contest(cfg: dict, path: str):
    """``(ContestData, metadata)`` of the dataset at ``path``, checked against the config."""
    wb = cw.require_whestbench()
    from whestbench.scoring import ContestSpec, make_contest_from_dataset

    with open(os.path.join(path, "metadata.json")) as f:
        meta = json.load(f)
    for key in ("width", "depth", "n_mlps", "n_samples"):
        if meta.get(key) != cfg[key]:
            raise ValueError(
                f"dataset {path} has {key}={meta.get(key)}, config says {cfg[key]}; "
                f"delete it or point 'dataset' elsewhere"
            )
    ds = wb.load_dataset(path, split=cfg["split"])
    # Timing limits off: this is an accuracy comparison, and JAX's work is invisible to flopscope's
    # residual-time accounting unless charged (cumjax charges it; see cumjax.whest).
    spec = ContestSpec(
        width=cfg["width"],
        depth=cfg["depth"],
        n_mlps=cfg["n_mlps"],
        flop_budget=int(cfg["flop_budget"]),
        ground_truth_samples=cfg["n_samples"],
        wall_time_limit_s=None,
        residual_wall_time_limit_s=None,
    )
    return make_contest_from_dataset(spec, ds, cfg["n_mlps"]), meta


def one_network(data, i: int):
    """The contest restricted to network ``i`` (so each network is scored and saved on its own)."""
    return dataclasses.replace(
        data,
        spec=dataclasses.replace(data.spec, n_mlps=1),
        mlps=[data.mlps[i]],
        all_layer_targets=[data.all_layer_targets[i]],
        final_targets=[data.final_targets[i]],
        avg_variances=[data.avg_variances[i]],
    )


# ----------------------------------------------------------------------------- scoring


def layer_variances(mlp, samples: int, seed: int) -> list[float]:
    """Mean per-neuron variance of every layer (``depth`` floats), by cumjax Monte Carlo on the
    converted network: sets the ground truth's noise floor ``variance / n_samples`` per layer."""
    spec, params = cw.to_cumjax(mlp, np.float32)
    res = cj.monte_carlo(jax.random.PRNGKey(seed), params, spec, cw.whest_input(spec.input_dim), samples)
    return [float(np.mean(np.asarray(res.sem[f"act{l}"]) ** 2 * samples)) for l in range(spec.num_layers - 1)]


class _Recorder:
    """``estimator`` as the scorer sees it, keeping its last prediction: the scorer reports MSEs
    only, and :func:`compare_to_truth` needs the estimates themselves."""

    def __init__(self, estimator):
        self._estimator, self.last = estimator, None

    def predict(self, mlp, budget):
        self.last = self._estimator.predict(mlp, budget)  # converted after the metered window
        return self.last

    def __getattr__(self, name):
        return getattr(self._estimator, name)


def score(estimator, data, i: int) -> dict:
    """WhestBench's score of network ``i`` and the final-layer prediction it scored (float32, as
    the scorer reads it)."""
    from whestbench.scoring import evaluate_estimator

    recorder = _Recorder(estimator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flopscope's symmetry/auto-routing notes inside the baselines
        report = evaluate_estimator(recorder, one_network(data, i), fail_fast=True)
    row = report["per_mlp"][0]
    out = {k: row[k] for k in ("final_layer_mse", "all_layers_mse", "per_layer_mse", "flops_used", "wall_time_s")}
    out["final_estimate"] = np.asarray(recorder.last, np.float32)[-1].tolist()
    return out


def _scored(store: ResultStore, name: str, i: int) -> bool:
    """Is network ``i`` scored for ``name``, with the prediction kept (older results lack it)?"""
    return f"{name}/{i}" in store and "final_estimate" in store[f"{name}/{i}"]


def estimators(cfg, variants):
    """``[(name, factory, info)]``: WhestBench's baselines first (cheap), then the cumjax variants
    (compiled and FLOP-counted by the caller) in config order."""
    out = []
    base = cw.baselines() if cfg["baselines"] else {}
    for name in cfg["baselines"]:
        out.append(
            (
                f"whest_{name}",
                lambda e=base[name]: e,
                {"flops_analytic": cw.baseline_flops(name, cfg["width"], cfg["depth"])},
            )
        )
    for v in variants:
        out.append(
            (f"cumjax_{v.name}", lambda v=v: cw.make_estimator(v, cfg["dtype"]), {"config": dataclasses.asdict(v)})
        )
    return out


def run(cfg, variants, data, store: ResultStore):
    n, width, depth = cfg["n_mlps"], cfg["width"], cfg["depth"]
    for i in range(n):
        store.get_or_compute(f"variance/{i}", lambda i=i: layer_variances(data.mlps[i], cfg["variance_samples"], i))
    for name, make, info in estimators(cfg, variants):
        todo = [i for i in range(n) if not _scored(store, name, i)]
        if f"info/{name}" in store and (not todo or "skipped" in store[f"info/{name}"]):
            continue
        est = make()
        if name.startswith("cumjax_"):
            if f"info/{name}" not in store:
                try:
                    _, compile_s = timed(est.warmup, width, depth)
                except MemoryError as e:  # e.g. unfactored k_max=4 at width 256: O(width^4) memory
                    store.put(f"info/{name}", {**info, "skipped": str(e)})
                    print(f"{name}: skipped ({str(e)[:100]}...)")
                    continue
                xla, xla_s = timed(
                    lambda: cw.layer_means_xla_flops(width, depth, est.config, est.dtype) if cfg["xla_flops"] else None
                )
                store.put(
                    f"info/{name}",
                    {
                        **info,
                        "flops": est.flops(width, depth),
                        "flops_xla_unrolled": xla,
                        "compile_s": compile_s,
                        "xla_count_s": xla_s,
                    },
                )
            else:
                est.warmup(width, depth)
        elif f"info/{name}" not in store:
            store.put(f"info/{name}", info)
        for i in tqdm(todo, desc=name, leave=False):
            store.put(f"{name}/{i}", score(est, data, i))


def summarize(cfg, data, store: ResultStore) -> dict:
    """Per estimator: MSEs over networks (mean, standard error, minus the ground truth's noise),
    wall time, FLOPs and the Monte Carlo FLOP-equivalence ratio of the final-layer MSE
    (:func:`compare_to_truth`)."""
    n, N = cfg["n_mlps"], cfg["n_samples"]
    final_floor = np.array([v / N for v in data.avg_variances])  # E[MSE of the ground truth itself]
    layer_floor = np.array([store[f"variance/{i}"] for i in range(n)]) / N  # (n, depth)
    truth = np.stack([np.asarray(t, np.float64) for t in data.final_targets])  # (n, width)
    # WhestBench keeps each network's average variance only: the same standard error on every neuron
    truth_sem = np.broadcast_to(np.sqrt(final_floor)[:, None], truth.shape)
    mc_flops = cfg["depth"] * (2 * cfg["width"] ** 2 + cfg["width"])  # one forward pass (matmuls + relus)
    avg_var = float(np.mean(data.avg_variances))
    rows = {}
    for key, info in store.entries.items():
        if not key.startswith("info/"):
            continue
        name = key[5:]
        if "skipped" in info:
            rows[name] = {"skipped": info["skipped"]}
            continue
        if not all(_scored(store, name, i) for i in range(n)):
            continue
        per = [store[f"{name}/{i}"] for i in range(n)]
        final = np.array([p["final_layer_mse"] for p in per])
        alll = np.array([p["all_layers_mse"] for p in per])
        per_layer = np.array([p["per_layer_mse"] for p in per])
        flops = info.get("flops", info.get("flops_analytic"))
        est = np.array([p["final_estimate"] for p in per])
        s = compare_to_truth(est, truth, truth_sem, N, flops, mc_flops)
        se = lambda x: float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")  # noqa: E731
        row = dict(
            final_mse=float(final.mean()),
            final_mse_se=s["mse_se"],
            final_mse_minus_noise=s["excess"],
            final_excess_se=s["excess_se"],
            all_mse=float(alll.mean()),
            all_mse_se=se(alll),
            all_mse_minus_noise=float(np.mean(alll - layer_floor.mean(1))),
            per_layer_mse=per_layer.mean(0).tolist(),
            wall_s=float(np.median([p["wall_time_s"] for p in per])),
            flops=flops,
            flops_xla=info.get("flops_xla_unrolled"),
            whest_flops=float(np.mean([p["flops_used"] for p in per])),
            # MC FLOPs to reach this MSE over the estimator's: a lower bound where it is not resolved
            mc_flop_ratio=s["ratio"] if s["resolved"] else s["ratio_lower"],
            mc_flop_ratio_range=[s["ratio_low"], s["ratio_high"]] if s["resolved"] else None,
            resolved=s["resolved"],
        )
        rows[name] = row
    return dict(
        rows=rows,
        noise_final=float(final_floor.mean()),
        noise_all=float(layer_floor.mean()),
        noise_per_layer=layer_floor.mean(0).tolist(),
        avg_variance=avg_var,
        mc_flops_per_sample=mc_flops,
    )


def print_table(summary: dict) -> None:
    print(
        f"\n{'estimator':<30}{'final MSE':>12}{'± se':>10}{'- noise':>11}{'all MSE':>11}{'- noise':>11}"
        f"{'FLOPs':>10}{'XLA FLOPs':>10}{'whest FLOPs':>12}{'wall s':>9}{'MC FLOPs/FLOPs':>16}"
    )
    for name, r in sorted(summary["rows"].items(), key=lambda kv: kv[1].get("flops") or 0):
        if "skipped" in r:
            print(f"{name:<30}  skipped: {r['skipped'][:90]}")
            continue
        ratio = f"{'' if r['resolved'] else '>='}{r['mc_flop_ratio']:.3g}"
        print(
            f"{name:<30}{r['final_mse']:>12.3e}{r['final_mse_se']:>10.1e}{r['final_mse_minus_noise']:>11.2e}"
            f"{r['all_mse']:>11.3e}{r['all_mse_minus_noise']:>11.2e}{r['flops']:>10.3g}"
            f"{'-' if r['flops_xla'] is None else format(r['flops_xla'], '.3g'):>10}{r['whest_flops']:>12.3g}"
            f"{r['wall_s']:>9.3f}{ratio:>16}"
        )
    print(
        f"ground-truth noise (variance / samples): final layer {summary['noise_final']:.2e}, "
        f"all layers {summary['noise_all']:.2e}"
    )
    first = [r["per_layer_mse"][0] for r in summary["rows"].values() if "skipped" not in r]
    if first:  # every estimator is exact on layer 1 (a Gaussian pre-activation): its MSE there is the noise
        print(
            f"layer 1, where every estimator is exact: MSE {min(first):.3g}..{max(first):.3g} vs predicted noise "
            f"{summary['noise_per_layer'][0]:.3g}"
        )


def plot(summary: dict, cfg: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {k: r for k, r in summary["rows"].items() if "skipped" not in r}
    names = sorted(rows, key=lambda k: rows[k]["flops"])
    fig, ax = plt.subplots(1, 3, figsize=(17, 5))
    x = np.arange(len(names))
    for off, key, label in ((-0.2, "final", "final layer"), (0.2, "all", "all layers")):
        ax[0].bar(
            x + off,
            [rows[k][f"{key}_mse"] for k in names],
            0.4,
            yerr=[rows[k][f"{key}_mse_se"] for k in names],
            label=label,
        )
    ax[0].axhline(summary["noise_final"], color="k", ls=":", label="ground-truth noise (final)")
    ax[0].set(
        yscale="log",
        ylabel="MSE vs WhestBench ground truth",
        title=f"width {cfg['width']}, depth {cfg['depth']}, {cfg['n_mlps']} networks",
    )
    ax[0].set_xticks(
        x, [k.replace("cumjax_", "").replace("whest_", "whest:") for k in names], rotation=60, ha="right", fontsize=8
    )
    ax[0].legend(fontsize=8)
    for k in names:
        ax[1].scatter(rows[k]["flops"], rows[k]["final_mse"], marker="s" if k.startswith("whest_") else "o", label=k)
    f = np.logspace(
        np.log10(min(rows[k]["flops"] for k in names)) - 1, np.log10(max(rows[k]["flops"] for k in names)) + 2, 50
    )
    ax[1].plot(
        f, summary["avg_variance"] * summary["mc_flops_per_sample"] / f, "k--", label="Monte Carlo: variance / samples"
    )
    ax[1].axhline(summary["noise_final"], color="k", ls=":", label="ground-truth noise")
    ax[1].set(
        xscale="log",
        yscale="log",
        xlabel="FLOPs per network",
        ylabel="final-layer MSE",
        title="final-layer MSE vs FLOPs",
    )
    ax[1].legend(fontsize=7)
    for k in names:
        ax[2].plot(np.arange(1, cfg["depth"] + 1), rows[k]["per_layer_mse"], marker="o", label=k)
    ax[2].plot(np.arange(1, cfg["depth"] + 1), summary["noise_per_layer"], "k:", label="ground-truth noise")
    ax[2].set(yscale="log", xlabel="layer", ylabel="MSE", title="MSE per layer")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "whestbench_smoke.json")
    )
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    cfg, variants = check_config(load_config(args.config))
    cw.require_whestbench()
    enable_x64()  # float64 Monte Carlo accumulation; estimates run in cfg["dtype"]
    name = cfg["name"]
    dataset = cfg.get("dataset") or os.path.join(args.out, f"whestbench_{name}", "dataset")
    if not os.path.exists(os.path.join(dataset, "metadata.json")):
        bake(cfg, dataset)
    data, meta = load_contest(cfg, dataset)
    store_meta = {
        k: cfg[k]
        for k in (
            "width",
            "depth",
            "n_mlps",
            "n_samples",
            "mlp_seeds",
            "dtype",
            "variance_samples",
            "flop_budget",
            "xla_flops",
        )
    }
    store_meta["dataset_created"] = meta.get("created_at_utc")
    store = ResultStore(os.path.join(args.out, f"whestbench_{name}.json"), meta=store_meta)
    print(
        f"config {name}: {cfg['n_mlps']} networks, width {cfg['width']}, depth {cfg['depth']}, "
        f"{cfg['n_samples']} ground-truth samples ({dataset}); device {jax.devices()[0]}"
    )
    run(cfg, variants, data, store)
    summary = summarize(cfg, data, store)
    store.data["summary"] = summary
    write_json_atomic(store.data, store.path)
    print_table(summary)
    plot(summary, cfg, os.path.join(args.out, f"whestbench_{name}.png"))
    print(f"\nwrote {store.path} and whestbench_{name}.png")
    return summary


if __name__ == "__main__":
    main()
