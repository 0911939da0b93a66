"""cumjax.advise: interpolation of measured curves, the Monte Carlo option, budget rules, CLI."""

import copy

import pytest

import cumjax as cj
from cumjax import cli

L = 3


def _table():
    """Synthetic measurements: MSE = c w^-k (exact power laws), FLOPs = f w^p, unit variance."""

    def variant(c, k, f, p, bound=False):
        return {
            str(w): dict(
                mse=[c * (l + 1) * w**-k for l in range(L)],
                bound=[bound] * L,
                flops=[f * (l + 1) * w**p for l in range(L)],
            )
            for w in (64, 256)
        }

    return dict(
        source="synthetic",
        depth_max=L,
        variance={"64": [1.0] * L, "256": [1.0] * L},
        variants={"k1_simple": variant(1.0, 1, 10.0, 2), "k2_simple": variant(1.0, 2, 100.0, 3)},
    )


def test_power_laws_interpolate_exactly_and_extrapolation_is_flagged():
    t = _table()
    a = cj.advise(128, 2, 1e12, t)
    got = {o.name: o for o in a.options}
    assert got["k2_simple"].mse == pytest.approx(2 * 128.0**-2)
    assert got["k2_simple"].flops == pytest.approx(200 * 128**3)
    assert got["k1_simple"].mse == pytest.approx(2 / 128) and not got["k1_simple"].extrapolated
    far = {o.name: o for o in cj.advise(1024, 2, 1e15, t).options}
    assert far["k2_simple"].extrapolated and far["k2_simple"].mse == pytest.approx(2 * 1024.0**-2)
    # Monte Carlo: variance / (budget / forward FLOPs)
    fwd = cj.forward_flops(cj.MLPSpec(128, 128, 128, 2, "relu"))
    assert got["monte_carlo"].mse == pytest.approx(fwd / 1e12) and got["monte_carlo"].flops == 1e12
    assert a.best == min(a.options, key=lambda o: o.mse) and a.options[0] == a.best


def test_budget_rules_and_bounds():
    t = _table()
    fwd = cj.forward_flops(cj.MLPSpec(256, 256, 256, 3, "relu"))
    k1 = 30.0 * 256**2  # k1's FLOPs at depth 3
    a = cj.advise(256, 3, k1 * 1.01, t)
    assert {o.name for o in a.options} == {"monte_carlo", "k1_simple"}  # k2 does not fit the budget
    b = copy.deepcopy(t)
    b["variants"]["k1_simple"]["64"]["bound"][2] = True  # an upper bound at width 64 only
    flagged = lambda w: {o.name: o for o in cj.advise(w, 3, 1e12, b).options}["k1_simple"].bound  # noqa: E731
    assert flagged(64) and flagged(128) and not flagged(256)  # 128 interpolates from 64; 256 is measured
    one = copy.deepcopy(t)
    del one["variants"]["k2_simple"]["256"]  # measured at one width: no trend, used only there
    assert "k2_simple" not in {o.name for o in cj.advise(128, 3, 1e12, one).options}
    assert "k2_simple" in {o.name for o in cj.advise(64, 3, 1e12, one).options}
    huge = cj.advise(256, 3, 1e30, t)
    assert huge.best.name == "monte_carlo"  # enough samples beat any biased estimator
    with pytest.raises(ValueError, match="depth"):
        cj.advise(256, L + 1, 1e9, t)
    with pytest.raises(ValueError, match="forward pass"):
        cj.advise(256, 3, fwd / 2, t)
    with pytest.raises(ValueError, match="flop_budget"):
        cj.advise(256, 3, float("nan"), t)


def test_shipped_table_and_cli(capsys):
    t = cj.advice.measured_table()
    assert t["depth_max"] >= 2 and t["variants"]
    for per_width in t["variants"].values():
        for row in per_width.values():
            assert len(row["mse"]) == len(row["flops"]) == t["depth_max"]
            assert all(f > 0 for f in row["flops"]) and all(m is None or m > 0 for m in row["mse"])
            # null only where the estimator diverged, and from there on
            first = next((i for i, m in enumerate(row["mse"]) if m is None), len(row["mse"]))
            assert first > 0 and all(m is None for m in row["mse"][first:])
    w = int(min(t["variance"], key=int))
    assert cli.main(["advise", "--width", str(w), "--depth", "2", "--flops", "1e9"]) == 0
    out = capsys.readouterr().out
    assert "best:" in out and "monte_carlo" in out
    assert cli.main(["advise", "--width", str(w), "--depth", "999", "--flops", "1e9"]) == 2


def test_merge_keeps_what_a_new_sweep_lacks():
    import advice_table  # experiments/, on pytest's pythonpath

    old = dict(_table(), activation="relu")
    new = copy.deepcopy(old)
    for v in new["variants"].values():  # the new run measured width 256 only, with other numbers
        del v["64"]
        v["256"]["mse"] = [2 * m for m in v["256"]["mse"]]
    del new["variance"]["64"]
    new["variants"]["k3_simple_fac"] = {"256": old["variants"]["k2_simple"]["256"]}
    del new["variants"]["k2_simple"]  # and not this variant at all (mse_vs_depth.py --only)
    got = advice_table.merge(old, new)
    assert got["variance"].keys() == {"64", "256"}
    assert got["variants"]["k1_simple"]["64"] == old["variants"]["k1_simple"]["64"]
    assert got["variants"]["k1_simple"]["256"] == new["variants"]["k1_simple"]["256"]
    assert got["variants"]["k2_simple"] == old["variants"]["k2_simple"]
    assert got["variants"]["k3_simple_fac"].keys() == {"256"}
    assert old["variance"].keys() == {"64", "256"} and "64" not in new["variance"]  # inputs untouched
    with pytest.raises(ValueError, match="same activation"):
        advice_table.merge(dict(old, depth_max=L + 1), new)
