"""Cost of the low-rank factored k=3/4 estimator against the dense one.

For every (width, k_max, term set, factored?) of the config, one jitted ``estimate_mean`` on a He
ReLU network runs in its own subprocess, which reports compile time, best-of-``repeats`` run time
and its peak resident memory (``ru_maxrss``, so one configuration's arrays never inflate another's).
Unfactored configurations that ``estimated_bytes`` says would not fit are recorded as skipped.
Log-log slopes of run time and peak memory against width are fitted per series (theory at fixed
depth: run ~ width^(k+1) unfactored, ~ width^k factored since the rank grows ~ width).

    python experiments/bench_factored.py --config configs/bench_factored_smoke.json --out results/

Side-by-side mode (``--reference SRC --reference-python PY``): after each factored configuration
the authors' PyTorch reference runs on the same weights (``reference_worker.py`` under PY, a
Python with torch; SRC the ``src`` folder of a local checkout), its output mean is compared with
cumjax's and ref/cumjax printed. Every row also gets its GFLOP/s against a matmul chain measured
in the same run.

Results go to ``<out>/bench_factored_<name>.json`` (atomically, after every configuration; a rerun
skips what is there) and a figure ``<out>/bench_factored_<name>.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

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
    res["flops"] = cj.estimator_flops(params, net, g, config)  # analytic count of the traced program
    if spec["factored"]:
        res["ranks"] = cj.factored_ranks(n, L, config)
    if spec.get("side_by_side"):  # the weights and output the reference is run and checked on
        import numpy as np

        d = spec["side_by_side"]
        np.savez(
            os.path.join(d, "weights.npz"),
            **{f"W{l}": np.asarray(W) for l, (W, _) in enumerate(cj.layer_weights(params))},
        )
        np.save(os.path.join(d, "cumjax_mean.npy"), np.asarray(r["out"], np.float64))
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


def _run_reference(spec: dict, src: str, python: str, timeout: float) -> dict:
    """Time the reference on the weights ``_worker`` saved in ``spec["side_by_side"]``; compare outputs."""
    import numpy as np

    d = spec["side_by_side"]
    out = os.path.join(d, "reference.npz")
    cmd = [
        python,
        os.path.join(HERE, "reference_worker.py"),
        src,
        json.dumps(spec),
        os.path.join(d, "weights.npz"),
        out,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode == -9:
        return {"error": "killed (SIGKILL: out of memory)"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    ref = np.load(out)
    mine = np.load(os.path.join(d, "cumjax_mean.npy"))
    return {
        "run_s": float(ref["run_s"]),
        "max_rel_diff": float(np.max(np.abs(mine - ref["mean"])) / np.max(np.abs(ref["mean"]))),
    }


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
    ap.add_argument(
        "--reference",
        default=None,
        help="src folder of a local checkout of the authors' reference: time it on the same weights beside "
        "every factored configuration (side-by-side mode)",
    )
    ap.add_argument("--reference-python", default="python3", help="an interpreter with torch for --reference")
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
        if key in store and not (args.reference and fac and f"{key}/reference" not in store):
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
        if not (args.reference and fac):
            res = _run_worker(spec, cfg.get("timeout_s", 3600))
            store.put(key, dict(res, estimated_bytes=est))
            continue
        with tempfile.TemporaryDirectory() as d:  # one run of each, back to back, on the same weights
            spec["side_by_side"] = d
            res = _run_worker(spec, cfg.get("timeout_s", 3600))
            store.put(key, dict(res, estimated_bytes=est))
            ref = (
                {"error": "cumjax failed"}
                if "error" in res
                else _run_reference(spec, args.reference, args.reference_python, cfg.get("timeout_s", 3600))
            )
            if "run_s" in ref:
                ref["ratio"] = ref["run_s"] / res["run_s"]
            store.put(f"{key}/reference", ref)

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
                    "gflops": [r["flops"] / r["run_s"] / 1e9 if "flops" in r else float("nan") for _, r in rows],
                    "run_slope": _slope([n for n, _ in fit], [r["run_s"] for _, r in fit]),
                    "rss_slope": _slope([n for n, _ in fit], [r["peak_rss_bytes"] for _, r in fit]),
                    "theory_run_slope": k if fac else k + 1,
                }
    from common import matmul_peak

    peak = matmul_peak(max(cfg["widths"]))  # in this run, beside the stored timings
    summary = {"config": cfg, "series": series, "entries": store.entries, "matmul_peak_gflops": peak}
    side = {k[: -len("/reference")]: r for k, r in store.entries.items() if k.endswith("/reference")}
    if side:
        print(f"{'side by side':<26}{'reference s':>12}{'cumjax s':>10}{'ref/cumjax':>11}{'max rel diff':>14}")
        for key, r in side.items():
            if "ratio" in r:
                print(
                    f"{key:<26}{r['run_s']:>12.3f}{store[key]['run_s']:>10.3f}{r['ratio']:>10.1f}x{r['max_rel_diff']:>14.1e}"
                )
            else:
                print(f"{key:<26}  {r['error']}")
    write_json_atomic(summary, os.path.join(args.out, f"bench_factored_{cfg['name']}_summary.json"))

    print(f"matmul peak (float32 (8192x{max(cfg['widths'])}) @ square, chained, this run): {peak:.1f} GFLOP/s")
    print(f"{'series':<22}{'width':>6}{'compile s':>11}{'run s':>10}{'peak GiB':>10}{'GFLOP/s':>9}{'% peak':>8}")
    for name, s in series.items():
        for n, c, r, m, g in zip(s["widths"], s["compile_s"], s["run_s"], s["peak_rss_gib"], s["gflops"]):
            print(f"{name:<22}{n:>6}{c:>11.2f}{r:>10.4f}{m:>10.2f}{g:>9.1f}{100 * g / peak:>7.0f}%")
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
