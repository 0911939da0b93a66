"""Time the authors' PyTorch reference (``mlp_kprop``) on given weights; run by ``bench_factored``.

Runs under an interpreter that has torch and the reference's dependencies, never under cumjax's:

    <python with torch> experiments/reference_worker.py REFERENCE_SRC SPEC_JSON WEIGHTS_NPZ OUT_NPZ

REFERENCE_SRC is the ``src`` folder of a local checkout of
github.com/alignment-research-center/mlp_cumulant_propagation (not part of this repository).
WEIGHTS_NPZ holds ``W{l}`` of shape (in, out) (cumjax's convention, ``pre = x @ W``); the network
has no biases and ReLU between layers. Writes the output mean ``mean`` (n,) and the run time
``run_s`` (best of ``repeats``, or of one run when that takes over a minute) to OUT_NPZ. Uses
torch's default threads (all cores), as cumjax uses XLA's.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def main(src: str, spec: dict, weights: str, out: str) -> None:
    sys.path.insert(0, src)
    import torch
    from mlp_kprop import kprop_harmonic as kprop
    from mlp_kprop.mlp import MLP

    dtype = {"float32": torch.float32, "float64": torch.float64}[spec["dtype"]]
    torch.set_grad_enabled(False)
    torch.set_default_dtype(dtype)
    n, L = spec["width"], spec["layers"]
    w = np.load(weights)
    mlp = MLP(n, n, n, L, nonlin="relu")
    for l, lin in enumerate(mlp.Ws):
        lin.weight.copy_(torch.from_numpy(w[f"W{l}"].T.copy()).to(dtype))
        if lin.bias is not None:
            lin.bias.zero_()
    K_in = {1: torch.zeros(n), 2: torch.eye(n)}
    kind = {"simple": kprop.Kind.SIMPLE, "augment": kprop.Kind.AUGMENT}[spec["kind"]]
    best, mean = float("inf"), None
    for _ in range(spec["repeats"]):
        t = time.perf_counter()
        K = kprop.mlp_kprop(mlp, K_in, spec["k"], kind=kind, factor=True, use_avg_metric=False, output_d_max=1)
        mean = K[1].to_tensor()
        best = min(best, time.perf_counter() - t)
        if best > 60:  # no compilation to amortise: one long run is its own best
            break
    np.savez(out, mean=mean.double().numpy(), run_s=best)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4])
