"""Command line: ``cumjax compare`` runs cumulant propagation and Monte Carlo on one random MLP."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import flops
from .activations import ACTIVATIONS
from .mlp import Init, MLPSpec, init_params
from .montecarlo import forward_flops, monte_carlo
from .propagate import PropagationConfig, estimate_mean
from .results import write_json_atomic


def _timed(compiled, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return out, time.perf_counter() - start


def compare(args) -> dict:
    """Estimate the output mean of one random MLP with every requested estimator and compare
    each with a Monte Carlo ground truth on the same parameters."""
    # x64 is on so that Monte Carlo accumulates in float64; the computation itself runs in
    # float32 unless --x64 (every array below is created in `dtype`).
    jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if args.x64 else jnp.float32
    init = Init(kind=args.init, q_star=args.q_star, w_var=args.w_var, b_var=args.bias_var, b_mean=args.bias_mean)
    spec = MLPSpec(input_dim=args.width, width=args.width, output_dim=args.width, num_layers=args.layers,
                   activations=(args.activation,) * (args.layers - 1)).with_bias_for(init)
    configs = [PropagationConfig(k_max=k, kind=kind, avg_metric=args.avg_metric, factored=args.factored and k >= 3,
                                 output_degree=1)
               for k in args.orders for kind in args.kinds]
    samples = int(float(args.samples))
    key_net, key_mc = jax.random.split(jax.random.PRNGKey(args.seed))
    params = init_params(key_net, spec, init, dtype=dtype)
    w_var = init.resolve(spec)[0]
    mean, cov = jnp.zeros(args.width, dtype), jnp.eye(args.width, dtype=dtype)

    mc = jax.jit(lambda p, key: monte_carlo(key, p, spec, mean, cov, samples, chunk_size=args.chunk))
    start = time.perf_counter()
    mc_compiled = mc.lower(params, key_mc).compile()
    mc_compile = time.perf_counter() - start
    truth, mc_time = _timed(mc_compiled, params, key_mc)
    out_label = f"pre{args.layers - 1}"
    gt = np.asarray(truth.mean[out_label], np.float64)
    noise = float(np.mean(np.asarray(truth.sem[out_label], np.float64) ** 2))
    var = noise * samples  # per-coordinate variance of the output, averaged
    per_sample = forward_flops(spec)

    rows = []
    for cfg in configs:
        fn = jax.jit(lambda p, m, c, cfg=cfg: estimate_mean(p, spec.activations, m, c, cfg, w_var))
        start = time.perf_counter()
        compiled = fn.lower(params, mean, cov).compile()
        compile_s = time.perf_counter() - start
        est, run_s = _timed(compiled, params, mean, cov)
        mse = float(np.mean((np.asarray(est, np.float64) - gt) ** 2))
        fl = flops.estimator_flops(params, spec.activations, mean, cov, cfg, w_var)
        # Samples Monte Carlo needs for the same MSE (noise floor removed), and their FLOPs.
        excess = max(mse - noise, 1e-300)
        rows.append(dict(estimator=cfg.name, mse=mse, mse_minus_noise=mse - noise, flops=fl, run_s=run_s,
                         compile_s=compile_s, mc_flops_to_match=var / excess * per_sample,
                         mc_flop_ratio=var / excess * per_sample / fl, resolved=mse > 2 * noise))
    rows.append(dict(estimator=f"monte_carlo_{samples}", mse=noise, mse_minus_noise=0.0, flops=float(samples * per_sample),
                     run_s=mc_time, compile_s=mc_compile, mc_flops_to_match=float(samples * per_sample), mc_flop_ratio=1.0, resolved=True))
    return dict(spec=dataclasses.asdict(spec), init=dataclasses.asdict(init), samples=samples, seed=args.seed,
                dtype=str(jnp.dtype(dtype)), output_variance=var, ground_truth_se2=noise, rows=rows,
                device=str(jax.devices()[0]))


def _print_table(result):
    print(f"network: {result['spec']}  init: {result['init']['kind']}  dtype: {result['dtype']}")
    print(f"ground truth: Monte Carlo with {result['samples']:.3g} samples, its own squared standard error "
          f"(noise floor) {result['ground_truth_se2']:.3e}, output variance {result['output_variance']:.3e}")
    head = f"{'estimator':<24}{'MSE vs MC':>12}{'MSE-floor':>12}{'FLOPs':>12}{'MC FLOPs/FLOPs':>16}{'run s':>9}{'compile s':>11}"
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        ratio = f"{r['mc_flop_ratio']:.3g}" if r["resolved"] else "below floor"
        print(f"{r['estimator']:<24}{r['mse']:>12.3e}{r['mse_minus_noise']:>12.3e}{r['flops']:>12.3e}{ratio:>16}{r['run_s']:>9.3f}{r['compile_s']:>11.2f}")
    print("MC FLOPs/FLOPs: FLOPs Monte Carlo needs to reach the estimator's MSE (noise floor removed) over the "
          "estimator's own FLOPs; 'below floor' means the estimator's error is under the ground truth's noise.")


def _parser():
    p = argparse.ArgumentParser(prog="cumjax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="cumulant propagation vs Monte Carlo on one random MLP")
    c.add_argument("--width", type=int, default=256)
    c.add_argument("--layers", type=int, default=5, help="number of linear layers")
    c.add_argument("--activation", default="relu", choices=ACTIVATIONS)
    c.add_argument("--orders", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2], help="k_max values, e.g. 1,2,3")
    c.add_argument("--kinds", type=lambda s: s.split(","), default=["simple", "augment"], help="term sets: simple,augment")
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
    c.add_argument("--x64", action="store_true", help="run in float64")
    c.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.command == "compare":
        try:
            result = compare(args)
        except (ValueError, MemoryError) as e:
            print(f"cumjax: error: {e}", file=sys.stderr)
            return 2
        _print_table(result)
        if args.json:
            write_json_atomic(result, args.json)
            print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
