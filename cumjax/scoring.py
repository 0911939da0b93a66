"""One scoring rule for estimators against a Monte Carlo ground truth: squared error with the
truth's own noise removed, and the Monte-Carlo-FLOP-equivalence ratio."""

from __future__ import annotations

import numpy as np


def compare_to_truth(
    estimates, truth_mean, truth_sem, num_samples: int, flops: float, forward_flops: float, z: float = 2.0
) -> dict:
    """Score estimates of a layer's mean against a Monte Carlo ground truth, over B networks.

    estimates, truth_mean, truth_sem: ``(B, n)`` (or ``(n,)`` for one network). Per network
    ``mse_i`` (per coordinate), ``floor_i = mean(sem^2)`` (the ground truth's own expected squared
    error) and ``excess_i = mse_i - floor_i`` (an unbiased estimate of the estimator's squared
    error); ``var_i = floor_i N`` is the per-coordinate variance of the layer. ``excess_se`` is the
    standard error across networks or, for one network, the one the truth's noise implies
    (``sqrt(sum(4 b^2 s^2 + 2 s^4)) / n`` with ``b = est - truth``, ``s = sem``).

    ``resolved``: the excess stands above both the noise floor and ``z`` standard errors; then
    ``ratio = var fwd / (excess flops)`` is the Monte Carlo FLOPs needed for the same squared error
    (at ``forward_flops`` per sample) over the estimator's ``flops``, with a range from excess +- se.
    Otherwise only ``mse_upper = max(excess + z se, floor)`` is known and ``ratio_lower`` is the
    ratio at that bound.
    """
    est, gt, sem = (np.atleast_2d(np.asarray(a, np.float64)) for a in (estimates, truth_mean, truth_sem))
    B, n = est.shape
    mse_i = np.mean((est - gt) ** 2, axis=-1)
    floor_i = np.mean(sem**2, axis=-1)
    excess_i = mse_i - floor_i
    if B > 1:
        se = lambda x: float(np.std(x, ddof=1) / np.sqrt(B))  # noqa: E731
        excess_se, mse_se = se(excess_i), se(mse_i)
    else:
        excess_se = mse_se = float(np.sqrt(np.sum(4 * (est - gt) ** 2 * sem**2 + 2 * sem**4)) / n)
    excess, floor = float(excess_i.mean()), float(floor_i.mean())
    var = float(floor * num_samples)
    resolved = bool(excess > floor and excess > z * excess_se)
    out = dict(
        mse=float(mse_i.mean()),
        mse_se=mse_se,
        noise_floor=floor,
        excess=excess,
        excess_se=excess_se,
        output_variance=var,
        flops=float(flops),
        forward_flops=float(forward_flops),
        resolved=resolved,
        mse_per_network=mse_i.tolist(),
    )
    scale = var * forward_flops / flops  # ratio = scale / mse
    if resolved:
        lo = excess - excess_se
        out.update(
            ratio=scale / excess,
            ratio_low=scale / (excess + excess_se),
            ratio_high=scale / lo if lo > 0 else float("inf"),
            mc_samples_to_match=var / excess,
        )
    else:
        upper = max(excess + z * excess_se, floor)
        out.update(mse_upper=upper, ratio_lower=scale / upper, mc_samples_to_match_lower=var / upper)
    return out
