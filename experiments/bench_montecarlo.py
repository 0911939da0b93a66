"""Monte Carlo throughput next to the machine's matmul peak, measured in one run.

Width 256, 5 linear layers (ReLU), float32: GFLOP/s of the jitted streaming sampler for several
chunk sizes, beside the GFLOP/s of a plain float32 matmul of the same inner shape (the peak this
workload can reach: a forward pass is a chain of (chunk x 256) @ (256 x 256) products).

    python experiments/bench_montecarlo.py [--width 256 --layers 5 --samples 4e6]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from common import matmul_peak, network, time_compiled

import cumjax as cj


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--samples", default="4e6")
    p.add_argument("--chunks", default="1024,2048,4096,16384,65536")
    args = p.parse_args(argv)
    n, L, samples = args.width, args.layers, int(float(args.samples))
    spec, params = network(0, n, L, "relu")
    gaussian = cj.Gaussian.standard(n, jnp.float32)
    per_sample = cj.forward_flops(spec)
    peak = matmul_peak(n)
    print(f"device: {jax.devices()[0]}  width {n}, {L} linear layers, {samples:.3g} samples, {per_sample} FLOPs/sample")
    print(f"matmul peak (float32 (8192x{n})@({n}x{n}), same run): {peak:8.1f} GFLOP/s")
    print(f"{'chunk':>8}{'time s':>10}{'GFLOP/s':>10}{'% of peak':>11}{'samples/s':>13}")
    rows = []
    for chunk in (int(c) for c in args.chunks.split(",")):

        def sample(p, key, chunk=chunk):
            return cj.monte_carlo(key, p, spec, gaussian, samples, chunk_size=chunk)

        t = time_compiled(sample, params, jax.random.PRNGKey(1), repeats=2)["run_s"]
        gflops = samples * per_sample / t / 1e9
        rows.append(dict(chunk=chunk, run_s=t, gflops=gflops, fraction_of_peak=gflops / peak))
        print(f"{chunk:>8}{t:>10.3f}{gflops:>10.1f}{100 * gflops / peak:>10.1f}%{samples / t:>13.3g}")
    print(
        "FLOPs count the forward pass only (2*in*out per linear layer + bias + activation); sampling the "
        "inputs and accumulating moments are extra work the sampler does on top."
    )
    return dict(width=n, layers=L, samples=samples, forward_flops=per_sample, matmul_peak_gflops=peak, rows=rows)


if __name__ == "__main__":
    main()
