"""Command line: ``cumjax compare`` runs cumulant propagation and Monte Carlo on one random MLP."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ._io import write_json_atomic
from .activations import ACTIVATIONS
from .advice import advise as _advise
from .advice import measured_table
from .config import PropagationConfig
from .flops import estimator_flops, forward_flops
from .gaussian import Gaussian
from .mlp import Init, MLPSpec, init_params
from .montecarlo import monte_carlo, plan_chunks
from .propagation import estimate_mean, validate
from .scoring import compare_to_truth

_HEAD = (
    f"{'estimator':<24}{'MSE vs MC':>12}{'MSE-floor':>12}{'FLOPs':>12}{'MC FLOPs/FLOPs':>16}{'run s':>9}"
    f"{'compile s':>11}"
)


def _say(*args):
    print(*args, flush=True)


def _timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def _configs(args) -> tuple[list[PropagationConfig], list[dict]]:
    """Every requested estimator that is a valid configuration, and the refused ones with the reason."""
    configs, refused = [], []
    for k in args.orders:
        for kind in args.kinds:
            try:
                configs.append(
                    PropagationConfig(
                        k_max=k,
                        kind=kind,
                        avg_metric=args.avg_metric,
                        factored=args.factored and k >= 3,
                        output_degree=1,
                    )
                )
            except (TypeError, ValueError) as e:
                refused.append(dict(estimator=f"k{k}_{kind}", reason=str(e)))
    return configs, refused


def _row(name, score, fl, run_s, compile_s) -> dict:
    ratio = score.get("ratio", score.get("ratio_lower"))
    return dict(
        estimator=name,
        mse=score["mse"],
        mse_minus_noise=score["excess"],
        mse_se=score["excess_se"],
        flops=fl,
        run_s=run_s,
        compile_s=compile_s,
        mc_flop_ratio=ratio,
        resolved=score["resolved"],
    )


def _print_row(r):
    ratio = (
        ""
        if r["mc_flop_ratio"] is None
        else f"{r['mc_flop_ratio']:.3g}"
        if r["resolved"]
        else f">={r['mc_flop_ratio']:.3g}"
    )
    _say(
        f"{r['estimator']:<24}{r['mse']:>12.3e}{r['mse_minus_noise']:>12.3e}{r['flops']:>12.3e}{ratio:>16}"
        f"{r['run_s']:>9.3f}{r['compile_s']:>11.2f}"
    )


def compare(args) -> dict:
    """Estimate the output mean of one random MLP with every requested estimator and score each
    against a Monte Carlo ground truth on the same parameters (:func:`cumjax.compare_to_truth`).
    Every configuration is checked (shapes, memory) before any heavy work; a refused one is
    reported and skipped, the others still run. Rows are printed as they finish."""
    dtype = jnp.float64 if args.x64 else jnp.float32
    init = Init(kind=args.init, q_star=args.q_star, w_var=args.w_var, b_var=args.bias_var, b_mean=args.bias_mean)
    spec = MLPSpec(
        input_dim=args.width,
        width=args.width,
        output_dim=args.width,
        num_layers=args.layers,
        activations=args.activation,
        init=init,
    )
    samples = int(float(args.samples))
    plan_chunks(samples, args.chunk)  # sample count and chunk checked now, not after the estimators
    configs, refused = _configs(args)
    key_net, key_mc = jax.random.split(jax.random.PRNGKey(args.seed))
    # Drawn in float32 whatever the precision, so --x64 changes only the arithmetic, not the network.
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), init_params(key_net, spec, dtype=jnp.float32))
    gaussian = Gaussian.standard(args.width, dtype)
    runnable = []
    for cfg in configs:
        try:
            validate(params, spec, gaussian, cfg)
            runnable.append(cfg)
        except (MemoryError, ValueError) as e:
            refused.append(dict(estimator=cfg.name, reason=str(e)))
    _say(
        f"network: {args.activation}, width {args.width}, {args.layers} linear layers, {args.init} init, "
        f"{jnp.dtype(dtype)}"
    )
    for r in refused:
        _say(f"refused {r['estimator']}: {r['reason']}")

    _say(f"Monte Carlo ground truth: {samples:.3g} samples (compiling, then running) ...")
    mc = jax.jit(lambda p, key: monte_carlo(key, p, spec, gaussian, samples, chunk_size=args.chunk))
    start = time.perf_counter()
    mc_compiled = mc.lower(params, key_mc).compile()
    mc_compile = time.perf_counter() - start
    truth, mc_time = _timed(mc_compiled, params, key_mc)
    out_label = spec.labels[-1]
    gt, sem = np.asarray(truth.mean[out_label], np.float64), np.asarray(truth.sem[out_label], np.float64)
    noise = float(np.mean(sem**2))
    per_sample = forward_flops(spec)
    _say(
        f"  done in {mc_time:.1f} s (compile {mc_compile:.1f} s); its noise floor mean(sem^2) = {noise:.3e}, "
        f"output variance {noise * samples:.3e}"
    )
    _say(_HEAD)
    _say("-" * len(_HEAD))

    rows = []
    for cfg in runnable:
        if cfg.k_max >= 3:  # compiles for seconds to tens of seconds
            _say(f"  compiling {cfg.name} ...")
        try:
            fn = jax.jit(lambda p, g, cfg=cfg: estimate_mean(p, spec, g, cfg))
            start = time.perf_counter()
            compiled = fn.lower(params, gaussian).compile()
            compile_s = time.perf_counter() - start
            est, run_s = _timed(compiled, params, gaussian)
            fl = estimator_flops(params, spec, gaussian, cfg)
        except (MemoryError, ValueError, RuntimeError) as e:  # XLA's out-of-memory is a RuntimeError
            refused.append(dict(estimator=cfg.name, reason=f"failed while running: {e}"))
            _say(f"{cfg.name:<24}failed: {e}")
            continue
        rows.append(_row(cfg.name, compare_to_truth(est, gt, sem, samples, fl, per_sample), fl, run_s, compile_s))
        _print_row(rows[-1])
    mc_row = dict(
        estimator=f"monte_carlo_{samples}",
        mse=noise,
        mse_minus_noise=0.0,
        mse_se=0.0,
        flops=float(samples * per_sample),
        run_s=mc_time,
        compile_s=mc_compile,
        mc_flop_ratio=1.0,
        resolved=True,
    )
    rows.append(mc_row)
    _print_row(mc_row)
    _say(
        "MC FLOPs/FLOPs: FLOPs Monte Carlo needs to reach the estimator's MSE (noise floor removed) over the "
        "estimator's own FLOPs; '>=' marks an error not resolved above the ground truth's noise (a lower bound)."
    )
    return dict(
        spec=dict(dataclasses.asdict(spec), init=dataclasses.asdict(init)),
        samples=samples,
        seed=args.seed,
        dtype=str(jnp.dtype(dtype)),
        output_variance=noise * samples,
        ground_truth_se2=noise,
        rows=rows,
        refused=refused,
        device=str(jax.devices()[0]),
    )


def _parser():
    p = argparse.ArgumentParser(prog="cumjax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="cumulant propagation vs Monte Carlo on one random MLP")
    c.add_argument("--width", type=int, default=256)
    c.add_argument("--layers", type=int, default=5, help="number of linear layers")
    c.add_argument("--activation", default="relu", choices=ACTIVATIONS)
    c.add_argument(
        "--orders", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2], help="k_max values, e.g. 1,2,3"
    )
    c.add_argument(
        "--kinds", type=lambda s: s.split(","), default=["simple", "augment"], help="term sets: simple,augment"
    )
    c.add_argument("--avg-metric", action="store_true", help="use the average metric E[W^T W]")
    c.add_argument("--factored", action="store_true", help="low-rank top cumulant for k_max 3 and 4")
    c.add_argument("--init", default="he", choices=["he", "critical", "manual"])
    c.add_argument("--q-star", type=float, default=None, help="fixed point for --init critical")
    c.add_argument("--w-var", type=float, default=None, help="weight variance * fan_in for --init manual")
    c.add_argument("--bias-mean", type=float, default=0.0)
    c.add_argument("--bias-var", type=float, default=0.0)
    c.add_argument("--samples", default="1e6", help="Monte Carlo samples for the ground truth")
    c.add_argument("--chunk", type=int, default=1024, help="Monte Carlo chunk size (memory bound)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--x64", action="store_true", help="compute in float64 (the same network, drawn in float32)")
    c.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = sub.add_parser("advise", help="which estimator gives the lowest error for a width, depth and FLOP budget")
    a.add_argument("--width", type=int, required=True)
    a.add_argument("--depth", type=int, required=True, help="number of linear layers")
    a.add_argument("--flops", type=float, required=True, help="FLOP budget for one estimate of the output mean")
    return p


def advise(args) -> None:
    """Print every affordable option for ``args`` (width, depth, flops), best first."""
    adv = _advise(args.width, args.depth, args.flops)
    _say(f"He ReLU, width {adv.width}, {adv.depth} linear layers, budget {adv.flop_budget:.3g} FLOPs")
    _say(f"measured curves: {measured_table()['source']}")
    _say(f"{'option':<24}{'predicted MSE':>16}{'FLOPs':>12}")
    for o in adv.options:
        note = " (upper bound)" if o.bound else ""
        note += " (width extrapolated)" if o.extrapolated else ""
        _say(f"{o.name:<24}{('<' if o.bound else '') + format(o.mse, '.2e'):>16}{o.flops:>12.3g}{note}")
    _say(f"best: {adv.best.name}")


def main(argv=None) -> int:
    """Exit status: 0 when every requested estimator ran, 3 when some were refused (the others'
    rows are printed and written), 2 for arguments that allow no run at all."""
    args = _parser().parse_args(argv)
    try:
        # Monte Carlo accumulates in float64 under x64; the computation stays in float32 unless --x64
        # (every array is created in an explicit dtype). Scoped: the caller's setting is untouched.
        if args.command == "advise":
            advise(args)
            return 0
        with jax.enable_x64(True):
            result = compare(args)
    except (TypeError, ValueError, MemoryError) as e:
        print(f"cumjax: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        write_json_atomic(result, args.json)
        _say(f"wrote {args.json}")
    return 3 if result["refused"] else 0


if __name__ == "__main__":
    sys.exit(main())
