"""Cost of the low-rank factored k=3/4 estimator against the dense one.

For every (width, k_max, term set, factored?) of the config, one jitted ``estimate_mean`` on a He
ReLU network runs in its own subprocess, which reports compile time, best-of-``repeats`` run time
and its peak resident memory (``ru_maxrss``, so one configuration's arrays never inflate another's).
Unfactored configurations that ``estimated_bytes`` says would not fit are recorded as skipped.
Log-log slopes of run time and peak memory against width are fitted per series (theory at fixed
depth: run ~ width^(k+1) unfactored, ~ width^k factored since the rank grows ~ width).

    python experiments/bench_factored.py --config configs/bench_factored_smoke.json --out results/

Results go to ``<out>/bench_factored_<name>.json`` (atomically, after every configuration; a rerun
skips what is there) and a figure ``<out>/bench_factored_<name>.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from common import ResultStore, fit_power_law, load_config, save_figure_atomic, write_json_atomic

HERE = os.path.dirname(os.path.abspath(__file__))


def _worker(spec: dict) -> dict:
    """Measure one configuration in this process (called in a fresh subprocess)."""
    import resource

    import jax.numpy as jnp
    from common import enable_x64, network, time_compiled

    import cumjax as cj

    if spec["dtype"] == "float64":
        enable_x64()
    dtype = jnp.dtype(spec["dtype"])
    n, L = spec["width"], spec["layers"]
    net, params = network(spec["seed"], n, L, "relu", dtype=dtype)
    config = cj.PropagationConfig(k_max=spec["k"], kind=spec["kind"], factored=spec["factored"])
    g = cj.Gaussian.standard(n, dtype)
    # already compiled: the first run counts too
    r = time_compiled(lambda p: cj.estimate_mean(p, net, g, config), params, repeats=spec["repeats"])
    res = {
        "compile_s": r["compile_s"],
        "run_s": r["run_s"],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "output_finite": bool(jnp.all(jnp.isfinite(r["out"]))),
    }
    if spec["factored"]:
        res["ranks"] = cj.factored_ranks(n, L, config)
    return res


def _run_worker(spec: dict, timeout: float) -> dict:
    import cumjax

    # the worker imports common from this folder and the same cumjax as this process
    paths = [HERE, os.path.dirname(os.path.dirname(os.path.abspath(cumjax.__file__))), os.environ.get("PYTHONPATH")]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(p for p in paths if p),
        XLA_FLAGS=os.environ.get("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true"),
    )
    try:
        proc = subprocess.run(
            [sys.executable, os.path.join(HERE, "bench_factored.py"), "--worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _slope(x, y):
    return fit_power_law(x, y)["slope"] if len(x) >= 2 else None


def _validate(cfg: dict) -> None:
    need = {"widths", "orders", "kinds", "layers", "dtype", "repeats"}
    missing = need - set(cfg)
    if missing:
        raise ValueError(f"config is missing {sorted(missing)}")
    if not cfg["widths"] or any(not isinstance(w, int) or w < 2 for w in cfg["widths"]):
        raise ValueError(f"widths must be integers >= 2, got {cfg['widths']}")
    if any(k not in (3, 4) for k in cfg["orders"]):
        raise ValueError(f"orders must be 3 or 4 (the factored variants), got {cfg['orders']}")
    if any(kind not in ("simple", "augment") for kind in cfg["kinds"]):
        raise ValueError(f"kinds must be simple/augment, got {cfg['kinds']}")
    if cfg["dtype"] not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, got {cfg['dtype']}")
    if not isinstance(cfg["layers"], int) or cfg["layers"] < 2:
        raise ValueError(f"layers must be an integer >= 2, got {cfg['layers']}")


def main(argv=None) -> dict:
    from tqdm import tqdm

    from cumjax import PropagationConfig, estimated_bytes
    from cumjax.memory import available_bytes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    _validate(cfg)
    itemsize = 4 if cfg["dtype"] == "float32" else 8
    L = cfg["layers"]
    store = ResultStore(os.path.join(args.out, f"bench_factored_{cfg['name']}.json"), meta=cfg)
    units = [
        (n, k, kind, fac)
        for k in cfg["orders"]
        for kind in cfg["kinds"]
        for fac in (True, False)
        for n in cfg["widths"]
    ]
    for n, k, kind, fac in tqdm(units, desc="bench_factored"):
        key = f"n{n}_k{k}_{kind}_{'fac' if fac else 'dense'}"
        if key in store:
            continue
        cap = cfg.get("max_width", {}).get(f"k{k}_{kind}_{'fac' if fac else 'dense'}")
        if cap is not None and n > cap:
            store.put(key, {"skipped": f"above this series' max_width {cap} (run time)"})
            continue
        config = PropagationConfig(k_max=k, kind=kind, factored=fac, output_degree=1)
        est = estimated_bytes(n, L, config, itemsize)
        if est > 0.8 * available_bytes():
            store.put(key, {"skipped": f"estimated {est / 2**30:.1f} GiB > 80% of free memory"})
            continue
        spec = {
            "width": n,
            "layers": L,
            "k": k,
            "kind": kind,
            "factored": fac,
            "dtype": cfg["dtype"],
            "repeats": cfg["repeats"],
            "seed": cfg.get("seed", 0),
        }
        res = _run_worker(spec, cfg.get("timeout_s", 3600))
        res["estimated_bytes"] = est
        store.put(key, res)

    series = {}
    for k in cfg["orders"]:
        for kind in cfg["kinds"]:
            for fac in (True, False):
                rows = [(n, store[f"n{n}_k{k}_{kind}_{'fac' if fac else 'dense'}"]) for n in cfg["widths"]]
                rows = [(n, r) for n, r in rows if "run_s" in r]
                name = f"k{k}_{kind}_{'fac' if fac else 'dense'}"
                fit = [(n, r) for n, r in rows if n >= cfg.get("fit_min_width", 0)]
                series[name] = {
                    "widths": [n for n, _ in rows],
                    "run_s": [r["run_s"] for _, r in rows],
                    "compile_s": [r["compile_s"] for _, r in rows],
                    "peak_rss_gib": [r["peak_rss_bytes"] / 2**30 for _, r in rows],
                    "run_slope": _slope([n for n, _ in fit], [r["run_s"] for _, r in fit]),
                    "rss_slope": _slope([n for n, _ in fit], [r["peak_rss_bytes"] for _, r in fit]),
                    "theory_run_slope": k if fac else k + 1,
                }
    summary = {"config": cfg, "series": series, "entries": store.entries}
    write_json_atomic(summary, os.path.join(args.out, f"bench_factored_{cfg['name']}_summary.json"))

    print(f"{'series':<22}{'width':>6}{'compile s':>11}{'run s':>10}{'peak GiB':>10}")
    for name, s in series.items():
        for n, c, r, m in zip(s["widths"], s["compile_s"], s["run_s"], s["peak_rss_gib"]):
            print(f"{name:<22}{n:>6}{c:>11.2f}{r:>10.4f}{m:>10.2f}")
        if s["run_slope"] is not None:
            print(
                f"{name:<22} slopes vs width: run {s['run_slope']:.2f} (theory {s['theory_run_slope']}), "
                f"peak memory {s['rss_slope']:.2f}"
            )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, s in series.items():
        if s["widths"]:
            style = "-" if name.endswith("fac") else "--"
            axes[0].loglog(s["widths"], s["run_s"], style, marker="o", label=name)
            axes[1].loglog(s["widths"], s["peak_rss_gib"], style, marker="o", label=name)
    axes[0].set(xlabel="width", ylabel="run time (s)", title=f"estimate_mean, {L} linear layers, {cfg['dtype']}")
    axes[1].set(xlabel="width", ylabel="peak RSS (GiB)", title="peak memory (own process)")
    axes[0].legend(fontsize=7)
    save_figure_atomic(fig, os.path.join(args.out, f"bench_factored_{cfg['name']}.png"), dpi=120)
    return summary


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
    else:
        main()
