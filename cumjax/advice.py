"""Which estimator to use: the lowest expected error for a width, depth and FLOP budget.

Backed by measured curves, not by theory: ``cumjax/data/advice.json`` holds, for every estimator
variant, width and layer of the error-vs-depth experiment (``experiments/mse_vs_depth.py``; He
ReLU networks on N(0, I), the mean of ``pre{depth-1}``), the measured MSE per coordinate (or its
upper bound where the ground truth could not resolve it), the estimator's FLOPs on a network of
that depth, and the layer's variance (Monte Carlo's MSE is ``variance / samples``). Between
measured widths MSE and FLOPs are interpolated log-log; outside them extrapolated along the
nearest two widths (and flagged); a variant measured at one width only is offered only there.
``experiments/advice_table.py`` rebuilds the file from a run.
"""

from __future__ import annotations

import dataclasses
import json
import math
from functools import cache
from importlib import resources

from .flops import forward_flops
from .mlp import MLPSpec

MONTE_CARLO = "monte_carlo"


@dataclasses.dataclass(frozen=True)
class Option:
    """One way to spend the budget: ``name`` (an estimator's ``PropagationConfig.name`` or
    ``"monte_carlo"``), its predicted MSE per coordinate and FLOPs. ``bound``: the MSE is an upper
    bound (unresolved in the measurements); ``extrapolated``: the width lies outside them."""

    name: str
    mse: float
    flops: float
    bound: bool = False
    extrapolated: bool = False


@dataclasses.dataclass(frozen=True)
class Advice:
    """``best`` and every affordable option (best first) for one (width, depth, budget)."""

    width: int
    depth: int
    flop_budget: float
    best: Option
    options: tuple[Option, ...]


@cache
def measured_table() -> dict:
    """The measured curves shipped with cumjax (``cumjax/data/advice.json``)."""
    with resources.files("cumjax").joinpath("data/advice.json").open() as f:
        return json.load(f)


def _interp(widths: list[int], values: list[float], width: float) -> tuple[float, bool, tuple[int, ...]]:
    """log-log interpolation of ``values`` over ``widths`` at ``width`` (extrapolated along the
    nearest two points outside them); ``(value, extrapolated, the widths it used)``."""
    pts = sorted((w, v) for w, v in zip(widths, values) if v is not None and v > 0)
    if not pts:
        return math.nan, True, ()
    exact = [v for w, v in pts if w == width]
    if exact:
        return exact[0], False, (width,)
    if len(pts) == 1:  # one measured width: no trend to follow
        return math.nan, True, ()
    outside = not pts[0][0] <= width <= pts[-1][0]
    i = max(1, min(len(pts) - 1, next((j for j, (w, _) in enumerate(pts) if w >= width), len(pts) - 1)))
    (w0, v0), (w1, v1) = pts[i - 1], pts[i]
    t = (math.log(width) - math.log(w0)) / (math.log(w1) - math.log(w0))
    return math.exp(math.log(v0) + t * (math.log(v1) - math.log(v0))), outside, (w0, w1)


def advise(width: int, depth: int, flop_budget: float, table: dict | None = None) -> Advice:
    """The estimator with the lowest predicted MSE for the mean of a ``depth``-layer He ReLU
    network of ``width`` within ``flop_budget`` FLOPs, against Monte Carlo with the same FLOPs.
    Raises ValueError for a depth the measurements do not cover or a budget below one forward
    pass."""
    table = table or measured_table()
    if not (isinstance(width, int) and width >= 1):
        raise ValueError(f"width must be a positive int, got {width!r}")
    if not (isinstance(depth, int) and 1 <= depth <= table["depth_max"]):
        raise ValueError(f"depth must be an int in 1..{table['depth_max']} (the measured range), got {depth!r}")
    if not (flop_budget > 0 and math.isfinite(flop_budget)):
        raise ValueError(f"flop_budget must be a positive number, got {flop_budget!r}")
    l = depth - 1
    ws = [int(w) for w in table["variance"]]
    variance = _interp(ws, [table["variance"][str(w)][l] for w in ws], width)[0]
    forward = forward_flops(MLPSpec(width, width, width, depth, "relu"))
    if flop_budget < forward:
        raise ValueError(f"a budget of {flop_budget:.3g} FLOPs buys no forward pass ({forward:.3g} FLOPs)")
    options = [Option(MONTE_CARLO, variance * forward / flop_budget, flop_budget, False, False)]
    for name, per_width in table["variants"].items():
        ws = [int(w) for w in per_width]
        mse, out1, used = _interp(ws, [per_width[str(w)]["mse"][l] for w in ws], width)
        flops, out2, _ = _interp(ws, [per_width[str(w)]["flops"][l] for w in ws], width)
        if not (math.isfinite(mse) and flops <= flop_budget):
            continue
        bound = any(per_width[str(w)]["bound"][l] for w in used)
        options.append(Option(name, mse, flops, bound, out1 or out2))
    options.sort(key=lambda o: (o.mse, o.flops))  # equal (bounded) errors: the cheaper first
    return Advice(width, depth, float(flop_budget), options[0], tuple(options))
