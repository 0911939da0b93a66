"""MSE of the estimated output mean vs FLOPs, cumulant propagation against Monte Carlo.

For each activation: ``networks`` He-initialised MLPs (``layers`` linear layers of ``width``,
N(0, I) input), a cached Monte Carlo ground truth over all of them at once
(:func:`cumjax.groundtruth.ground_truth`), and every estimator variant (k_max x term set, plus the
factored term set for k_max 3/4) evaluated jitted and vmapped over the networks. For each variant:
MSE per output coordinate, the ground truth's noise floor (subtracted and shown), standard errors
across networks, FLOPs (:func:`cumjax.estimator_flops`) and the Monte Carlo FLOP-equivalence ratio
(MC FLOPs needed for the same MSE / the estimator's FLOPs), or an upper bound on the MSE (a lower
bound on the ratio) when the MSE is not resolved above the noise floor. Monte Carlo itself is the
line MSE(m) = variance / m at m forward passes. Variants the memory guard refuses are recorded as
skipped with the reason (and retried on a rerun).

    python experiments/mse_vs_flops.py --config configs/mse_vs_flops_smoke.json --out results/

Writes ``<out>/mse_vs_flops_<name>.json`` after every ground truth and every variant (a rerun
resumes), and ``<out>/mse_vs_flops_<name>.png``. Ground truths are cached in ``<out>/gt_cache``.
"""

from __future__ import annotations

import argparse
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from common import ResultStore, compare_to_truth, enable_x64, load_config, save_figure_atomic, timed, write_json_atomic
from common import networks as stacked_networks

import cumjax as cj
from cumjax import flops
from cumjax import groundtruth as gt

REQUIRED = ("width", "layers", "activations", "networks", "gt_samples", "orders", "kinds")
DTYPES = {"float32": jnp.float32, "float64": jnp.float64}


# ----------------------------------------------------------------------------- shared with mse_vs_width


def check_config(cfg: dict, required=REQUIRED) -> None:
    """Raise ValueError on a config that cannot run (before any heavy work)."""
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ValueError(f"config {cfg.get('name')!r} lacks {missing}")
    for a in cfg["activations"]:
        if a not in cj.ACTIVATIONS:
            raise ValueError(f"unknown activation {a!r}; choose from {sorted(cj.ACTIVATIONS)}")
    if int(cfg["networks"]) < 2:
        raise ValueError("need networks >= 2 (standard errors across networks)")
    for k in cfg["orders"]:
        if k not in (1, 2, 3, 4):
            raise ValueError(f"orders must be in 1..4, got {k!r}")
    for kind in cfg["kinds"]:
        if kind not in cj.KINDS:
            raise ValueError(f"unknown kind {kind!r}; choose from {cj.KINDS}")
    for name, dt in {"": cfg.get("estimator_dtype", "float64"), **cfg.get("estimator_dtypes", {})}.items():
        if dt not in DTYPES:
            where = f"estimator_dtypes[{name!r}]" if name else "estimator_dtype"
            raise ValueError(f"{where} must be one of {sorted(DTYPES)}, got {dt!r}")
    if int(float(cfg["gt_samples"])) < 2:
        raise ValueError("gt_samples must be >= 2")


def variants(cfg) -> list[cj.PropagationConfig]:
    """Every (k_max, term set) of the config, and the factored term set for k_max 3/4 (``factored``,
    default true; ``dense_high: false`` leaves out the unfactored k_max 3/4)."""
    out = []
    for k in cfg["orders"]:
        for kind in cfg["kinds"]:
            if k < 3 or cfg.get("dense_high", True):
                out.append(cj.PropagationConfig(k_max=k, kind=kind, output_degree=1))
            if k >= 3 and cfg.get("factored", True):
                out.append(cj.PropagationConfig(k_max=k, kind=kind, factored=True, output_degree=1))
    return out


def init_of(cfg) -> cj.Init:
    """He init, with the config's optional ``init`` fields (e.g. ``b_mean``, ``b_var`` for biases)."""
    return cj.Init(**{"kind": "he", **cfg.get("init", {})})


def make_spec(width: int, layers: int, activation: str, init: cj.Init | None = None) -> cj.MLPSpec:
    return cj.MLPSpec(
        input_dim=width,
        width=width,
        output_dim=width,
        num_layers=layers,
        activations=activation,
        init=init or cj.Init(),
    )


def networks(cfg, spec: cj.MLPSpec):
    """``networks`` float32 MLPs drawn from ``spec.init`` stacked on a leading axis (seeds
    seed..seed+B-1; the same weights for every activation of one width)."""
    return stacked_networks(int(cfg.get("seed", 0)), int(cfg["networks"]), spec, jnp.float32)


def truth_for(cfg, spec, params, cache_dir, progress=True, max_blocks=None, layers=None):
    """The cached ground truth of the output (mean, sem (B, n)), the sample count and seconds.
    max_blocks: sample at most that many more blocks, and use the samples done so far (a partial
    ground truth, with its larger noise floor) if that does not finish it; None if none are done.
    layers: read ``pre{l}`` for each of these layers instead: mean, sem of shape (B, len(layers), n)
    (every layer is sampled either way, so both read the same cached ground truth)."""
    res, secs = timed(
        lambda: gt.ground_truth(
            params,
            spec,
            cj.Gaussian.standard(spec.input_dim, jnp.float32),
            int(float(cfg["gt_samples"])),
            int(cfg.get("gt_seed", 0)),
            cache_dir=cache_dir,
            chunk_size=cfg.get("gt_chunk"),
            block_chunks=int(cfg.get("gt_block_chunks", 16)),
            max_blocks=max_blocks,
            partial=max_blocks is not None,
            all_layers=layers is not None,
            progress=progress,
        )
    )
    if res is None:
        return None
    if layers is None:
        label = spec.labels[-1]
        return np.asarray(res.mean[label]), np.asarray(res.sem[label]), res.num_samples, secs
    pick = lambda d: np.stack([np.asarray(d[f"pre{l}"]) for l in layers], axis=1)  # noqa: E731
    return pick(res.mean), pick(res.sem), res.num_samples, secs


def estimator_dtype(cfg, config: cj.PropagationConfig) -> str:
    """``estimator_dtypes[variant name]`` if given (e.g. float32 where float64 would not fit in
    memory), else ``estimator_dtype``."""
    return cfg.get("estimator_dtypes", {}).get(config.name, cfg.get("estimator_dtype", "float64"))


def flop_report(cfg, spec, params, config: cj.PropagationConfig) -> dict:
    """FLOPs of one estimate (network 0 of ``params``): the analytic count beside XLA's count of
    the unrolled program (``xla_flops``, default true), or the analytic count alone."""
    dtype = DTYPES[estimator_dtype(cfg, config)]
    single = jax.tree_util.tree_map(lambda x: jnp.asarray(x[0], dtype), params)
    g = cj.Gaussian.standard(spec.input_dim, dtype)
    if cfg.get("xla_flops", True):
        return flops.estimator_flop_report(single, spec, g, config)
    return dict(analytic=cj.estimator_flops(single, spec, g, config))


def run_variant(
    cfg, spec, params, config: cj.PropagationConfig, checkpoint=None, estimate=cj.estimate_mean, nonfinite_ok=False
) -> dict:
    """Estimates (B, ...) of one variant for every network (``estimate(params, spec, gaussian,
    config)``, default the output mean), its FLOPs and times; or ``{"status": "skipped", "reason":
    ...}`` when the memory guard refuses it, ``{"status": "failed", ...}`` when an estimate is not
    finite (unless ``nonfinite_ok``: the caller scores where the estimator diverged).
    checkpoint: ``(store, key)``: the estimates of every finished group of networks (one network
    per group where they are too large to vmap together) are saved under ``key + "#partial"`` and a
    rerun starts after them (an interrupted hour-long variant loses at most one group)."""
    dtype_name = estimator_dtype(cfg, config)
    dtype = DTYPES[dtype_name]
    g = cj.Gaussian.standard(spec.input_dim, dtype)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)
    B = jax.tree_util.tree_leaves(params)[0].shape[0]
    # vmap over as many networks at once as fit the memory budget (k_max >= 3 at large widths: one)
    per_net = cj.estimated_bytes(spec.width, spec.num_layers, config, jnp.dtype(dtype).itemsize)
    budget = float(cfg.get("vmap_bytes", 4e9))
    # Factored estimators run one network at a time: vmapped, XLA on CPU lays their n^3 sums out
    # around the batch axis and runs them several times slower per network (k4 augment
    # factored, width 64, depth 8: 14x, even for a batch of one; k4 simple 1.8x, k3 1.3x).
    batch = 1 if config.is_factored else int(max(1, min(B, budget // max(per_net, 1))))
    one = lambda p: estimate(p, spec, g, config)  # noqa: E731
    if batch > 1:
        fn = jax.jit(lambda ps: jax.lax.map(one, ps, batch_size=batch))
    else:  # one network per call, not vmapped (lax.map's batch_size=1 still vmaps the body)
        fn = jax.jit(
            lambda ps: jax.tree_util.tree_map(lambda y: y[None], one(jax.tree_util.tree_map(lambda x: x[0], ps)))
        )
    store, pkey = checkpoint if checkpoint is not None else (None, None)
    old = store.entries.get(pkey) if store is not None else None
    resume = old is not None and old.get("dtype") == dtype_name and len(old["estimates"]) <= B
    done = [np.asarray(e) for e in old["estimates"]] if resume else []
    run_total, compile_s, compiled = (old["run_s_total"] if resume else 0.0), 0.0, {}
    try:
        # first: its trace meets the memory guard while this process holds nothing yet
        report = flop_report(cfg, spec, params, config)
        for i in range(len(done), B, batch):
            part = jax.tree_util.tree_map(lambda x, i=i: x[i : i + batch], params)
            size = min(batch, B - i)
            if size not in compiled:
                compiled[size], secs = timed(lambda part=part: fn.lower(part).compile())
                compile_s += secs
            out, secs = timed(compiled[size], part)
            done.extend(np.asarray(out))
            run_total += secs
            if store is not None:
                store.put(
                    pkey,
                    dict(
                        status="partial",
                        dtype=dtype_name,
                        run_s_total=run_total,
                        compile_s=compile_s,
                        estimates=[e.tolist() for e in done],
                    ),
                )
        est = np.stack(done)
        fl = report["analytic"]
    except (MemoryError, NotImplementedError) as e:
        return dict(status="skipped", reason=f"{type(e).__name__}: {e}")
    except jax.errors.JaxRuntimeError as e:  # allocation failure at run time
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return dict(status="skipped", reason=f"out of memory at run time: {str(e)[:300]}")
    if store is not None:
        store.entries.pop(pkey, None)
    if not (nonfinite_ok or np.all(np.isfinite(est))):
        return dict(status="failed", reason="non-finite estimate")
    if resume and not compiled:  # every network was done before: report that run's compile time
        compile_s = old.get("compile_s", 0.0)
    return dict(
        status="ok",
        estimates=est,
        flops=fl,
        flop_report=report,
        run_s=run_total / B,
        compile_s=compile_s,
        vmap_batch=batch,
        dtype=dtype_name,
    )


EST_KEYS = ("width", "widths", "layers", "networks", "seed", "init", "estimator_dtype", "xla_flops")


def estimates_store(path: str, cfg: dict) -> ResultStore:
    """Estimates of every variant, kept apart from the scores: they do not depend on the ground
    truth (computed while it runs with ``--estimates-only``, rescored when it changes)."""
    return ResultStore(path, meta={k: cfg[k] for k in EST_KEYS if k in cfg})


def evaluate(
    store: ResultStore,
    key: str,
    cfg,
    spec,
    params,
    truth,
    config,
    redo=None,
    estimates=None,
    exclude=None,
    recount=None,
) -> dict | None:
    """Score one variant against the truth, through the stores (skipped/failed entries are
    retried); with ``truth`` None only compute and store the estimates (returns None).
    exclude: regex of keys not to run now (a stored score is kept; otherwise recorded as skipped,
    e.g. variants too large for this machine, and run by a later call without it).
    recount: regex of keys whose stored estimates are kept and rescored with a fresh FLOP report
    (for a change to the code's cost that leaves its results alone)."""
    old = store.entries.get(key)
    if exclude and re.search(exclude, key):
        if truth is None:
            return None
        if old is not None and old.get("status") == "ok":
            return old
        r = dict(
            estimator=config.name, status="skipped", reason=f"excluded on the command line (--exclude {exclude!r})"
        )
        store.put(key, r)
        return r
    redo = bool(redo and re.search(redo, key))
    recount = bool(recount and re.search(recount, key))
    if truth is not None and old is not None and old.get("status") == "ok" and not (redo or recount):
        return old
    r = None if estimates is None or redo else estimates.entries.get(key)
    if recount and r is not None and r.get("status") == "ok":
        report = flop_report(cfg, spec, params, config)
        r = dict(r, flops=report["analytic"], flop_report=report)
        estimates.put(key, r)
        r = dict(r, estimates=np.asarray(r["estimates"]))
    elif r is None or r.get("status") != "ok":
        r = run_variant(cfg, spec, params, config, None if estimates is None else (estimates, f"{key}#partial"))
        if estimates is not None:
            estimates.put(key, dict(r, estimates=r["estimates"].tolist()) if r["status"] == "ok" else r)
    if truth is None:
        return None
    mean, sem, n, _ = truth
    if r["status"] == "ok":
        score = compare_to_truth(r["estimates"], mean, sem, n, r["flops"], cj.forward_flops(spec))
        r = dict(
            status="ok",
            estimator=config.name,
            **score,
            flop_report=r["flop_report"],
            run_s=r["run_s"],
            compile_s=r["compile_s"],
            vmap_batch=r["vmap_batch"],
            dtype=r.get("dtype", estimator_dtype(cfg, config)),
        )
    else:
        r = dict(estimator=config.name, **r)
    store.put(key, r)
    return r


def fmt_row(r: dict) -> str:
    if r.get("status") != "ok":
        return f"{r['estimator']:<22} {r['status']}: {r['reason'][:110]}"
    if r["resolved"]:
        mse = f"{r['excess']:.3e}+-{r['excess_se']:.1e}"
        ratio = f"{r['ratio']:.3g} [{r['ratio_low']:.3g}, {r['ratio_high']:.3g}]"
    else:
        mse, ratio = f"< {r['mse_upper']:.3e}", f">= {r['ratio_lower']:.3g}"
    return f"{r['estimator']:<22}{mse:>22}{r['mse']:>11.3e}{r['flops']:>11.3e}{ratio:>28}{r['run_s']:>9.3f}"


HEADER = (
    f"{'estimator':<22}{'MSE - floor (+-se)':>22}{'raw MSE':>11}{'FLOPs':>11}{'MC FLOPs to match / FLOPs':>28}"
    f"{'run s':>9}"
)


# ----------------------------------------------------------------------------- this experiment


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acts = list(summary)
    fig, axes = plt.subplots(1, len(acts), figsize=(6.5 * len(acts), 5), squeeze=False)
    for ax, act in zip(axes[0], acts):
        s = summary[act]
        fwd, var = s["forward_flops"], s["output_variance"]
        ok = [r for r in s["rows"] if r.get("status") == "ok"]
        fl = [r["flops"] for r in ok] + [fwd]
        m = np.logspace(np.log10(max(min(fl) / fwd / 10, 1)), np.log10(max(fl) / fwd * 10 + 10), 100)
        ax.plot(m * fwd, var / m, "k-", label="Monte Carlo: var / m")
        ax.axhline(
            s["noise_floor"], color="gray", ls=":", label=f"ground-truth noise floor ({s['gt_samples']:.2g} samples)"
        )
        for i, r in enumerate(ok):
            c = f"C{i % 10}"
            if r["resolved"]:
                err = [[r["excess_se"]], [r["excess_se"]]]
                ax.errorbar(
                    r["flops"],
                    r["excess"],
                    yerr=err,
                    fmt="o",
                    color=c,
                    capsize=3,
                    label=f"{r['estimator']} ({r['ratio']:.3g}x)",
                )
            else:
                ax.errorbar(
                    r["flops"],
                    r["mse_upper"],
                    yerr=[[r["mse_upper"] * 0.5], [0]],
                    uplims=True,
                    fmt="v",
                    color=c,
                    label=f"{r['estimator']} (< bound, >= {r['ratio_lower']:.3g}x)",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("FLOPs")
        ax.set_ylabel("MSE per output coordinate (noise floor subtracted)")
        ax.set_title(f"{act}: width {s['width']}, {s['layers']} linear layers, {s['networks']} networks")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "mse_vs_flops_smoke.json")
    )
    p.add_argument("--out", default="results")
    p.add_argument("--activations", default=None, help="comma-separated subset of the config's activations")
    p.add_argument("--redo", default=None, help="regex: recompute the variants whose key matches")
    p.add_argument("--exclude", default=None, help="regex: variants not to run now (recorded as skipped unless scored)")
    p.add_argument("--recount", default=None, help="regex: rescore stored estimates with a fresh FLOP count")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--estimates-only", action="store_true", help="compute and store the estimates, no ground truth")
    p.add_argument(
        "--truth-blocks",
        type=int,
        default=None,
        help="sample at most this many more ground-truth blocks and score against the samples done so far",
    )
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    check_config(cfg)
    acts = cfg["activations"] if args.activations is None else args.activations.split(",")
    bad = [a for a in acts if a not in cfg["activations"]]
    if bad:
        raise ValueError(f"activations {bad} are not in the config ({cfg['activations']})")
    enable_x64()  # float64 accumulation; arrays carry explicit dtypes

    name = f"mse_vs_flops_{cfg['name']}"
    meta = {k: v for k, v in cfg.items() if k != "activations"}
    store = ResultStore(os.path.join(args.out, f"{name}.json"), meta=meta)
    cache = os.path.join(args.out, "gt_cache")
    est = estimates_store(os.path.join(args.out, f"{name}_estimates.json"), cfg)
    summary = store.data.get("summary", {})
    print(f"device: {jax.devices()[0]}  config: {cfg['name']}")
    for act in acts:
        spec = make_spec(int(cfg["width"]), int(cfg["layers"]), act, init_of(cfg))
        params = networks(cfg, spec)
        if args.estimates_only:
            for config in variants(cfg):
                evaluate(store, f"{act}/{config.name}", cfg, spec, params, None, config, args.redo, est, args.exclude)
                status = est.entries.get(f"{act}/{config.name}", {}).get("status", "excluded")
                print(f"  {act} {config.name}: {status}", flush=True)
            continue
        truth = truth_for(cfg, spec, params, cache, progress=not args.no_progress, max_blocks=args.truth_blocks)
        if truth is None:
            print(f"{act}: no ground-truth samples yet")
            continue
        mean, sem, n, secs = truth
        tkey = f"{act}/truth"
        if tkey in store and store[tkey]["num_samples"] != n:  # the ground truth grew: rescore this activation
            for k in [k for k in store.entries if k.startswith(f"{act}/")]:
                del store.entries[k]
        if tkey not in store:
            floor = float(np.mean(sem.astype(np.float64) ** 2))
            mc_report = (
                flops.montecarlo_flop_report(jax.tree_util.tree_map(lambda x: x[0], params), spec)
                if cfg.get("xla_flops", True)
                else None
            )  # per-sample counts beside forward_flops
            store.put(
                tkey,
                dict(
                    num_samples=n,
                    noise_floor=floor,
                    output_variance=floor * n,
                    seconds=secs,
                    forward_flops=cj.forward_flops(spec),
                    mc_flop_report=mc_report,
                ),
            )
        t = store[tkey]
        print(
            f"\n{act}: ground truth {n:.3g} samples x {cfg['networks']} networks, noise floor "
            f"{t['noise_floor']:.3e}, output variance {t['output_variance']:.4f}, forward FLOPs "
            f"{cj.forward_flops(spec):.3e}"
        )
        rows = []
        for config in variants(cfg):
            rows.append(
                evaluate(
                    store,
                    f"{act}/{config.name}",
                    cfg,
                    spec,
                    params,
                    truth,
                    config,
                    args.redo,
                    est,
                    args.exclude,
                    args.recount,
                )
            )
            print("  " + fmt_row(rows[-1]), flush=True)
        summary[act] = dict(
            width=cfg["width"],
            layers=cfg["layers"],
            networks=cfg["networks"],
            gt_samples=n,
            noise_floor=t["noise_floor"],
            output_variance=t["output_variance"],
            forward_flops=cj.forward_flops(spec),
            rows=rows,
        )
        ok = [r for r in rows if r.get("status") == "ok"]
        best = max(ok, key=lambda r: r["ratio"] if r["resolved"] else r["ratio_lower"], default=None)
        summary[act]["best"] = None if best is None else best["estimator"]
        store.data["summary"] = summary
        write_json_atomic(store.data, store.path)
        print(f"\n{act}: " + HEADER)
        for r in rows:
            print(f"{act}: " + fmt_row(r))
    if summary:
        plot(summary, os.path.join(args.out, f"{name}.png"))
        print(f"\nwrote {store.path} and {name}.png")
    return store.data


if __name__ == "__main__":
    main()
