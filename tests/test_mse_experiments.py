"""mse_vs_flops and mse_vs_width run end to end on their smoke configs, resume, and skip refused variants."""

import dataclasses
import json
import os

import jax
import mse_vs_flops as mvf  # experiments/, on pytest's pythonpath
import mse_vs_width as mvw
import numpy as np
import pytest

import cumjax as cj
from cumjax import groundtruth as gt
from cumjax import memory

ROOT = os.path.join(os.path.dirname(__file__), "..")

CFG = lambda name: os.path.join(ROOT, "configs", f"{name}.json")  # noqa: E731


def _no_recompute(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("recomputed a stored result")

    monkeypatch.setattr(mvf, "run_variant", boom)
    monkeypatch.setattr(gt, "_step", boom)


def test_mse_vs_flops_smoke_and_resume(tmp_path, monkeypatch):
    args = ["--config", CFG("mse_vs_flops_smoke"), "--out", str(tmp_path), "--no-progress"]
    data = mvf.main(args)
    cfg = json.load(open(CFG("mse_vs_flops_smoke")))
    assert set(data["summary"]) == set(cfg["activations"])
    names = {c.name for c in mvf.variants(cfg)}
    for act, s in data["summary"].items():
        spec = mvf.make_spec(cfg["width"], cfg["layers"], act)
        assert s["forward_flops"] == cj.forward_flops(spec)
        assert {r["estimator"] for r in s["rows"]} == names
        for r in s["rows"]:
            assert r["status"] == "ok" and r["flops"] > 0
            assert r["noise_floor"] == pytest.approx(s["noise_floor"])
            scale = s["output_variance"] * s["forward_flops"] / r["flops"]
            if r["resolved"]:
                assert r["excess"] > r["noise_floor"] and r["ratio"] == pytest.approx(scale / r["excess"])
            else:  # unresolved: a bound, never a ratio
                assert "ratio" not in r and r["ratio_lower"] == pytest.approx(scale / r["mse_upper"])
    # tanh is odd and the input symmetric: the output mean is exactly 0, every estimator gets it, and
    # their measured MSE is the ground truth's own noise, i.e. below the floor -> upper bounds only
    if "tanh" in data["summary"]:
        rows = data["summary"]["tanh"]["rows"]
        assert not any(r["resolved"] for r in rows)
        spec = mvf.make_spec(cfg["width"], cfg["layers"], "tanh")
        truth, sem, _, _ = mvf.truth_for(cfg, spec, mvf.networks(cfg, spec), str(tmp_path / "gt_cache"), progress=False)
        s2 = sem.astype(np.float64) ** 2
        assert all(r["mse"] == pytest.approx(np.mean(truth.astype(np.float64) ** 2), rel=1e-9) for r in rows)
        # E[mean(truth^2)] = mean(sem^2) with sd sqrt(2 sum sem^4) / count (Gaussian sample means)
        assert abs(rows[0]["mse"] - s2.mean()) < 5 * np.sqrt(2 * np.sum(s2**2)) / s2.size
    assert (tmp_path / "mse_vs_flops_smoke.png").stat().st_size > 0
    saved = json.loads((tmp_path / "mse_vs_flops_smoke.json").read_text())
    assert saved["entries"].keys() == data["entries"].keys()

    # a rerun recomputes nothing (ground truth from the cache, variants from the store)
    with monkeypatch.context() as m:
        _no_recompute(m)
        again = mvf.main(args)
    assert again["entries"] == data["entries"]

    # --recount keeps the stored estimates (nothing is rerun) and rescores them with a fresh FLOP count
    est_path = tmp_path / "mse_vs_flops_smoke_estimates.json"
    est = json.loads(est_path.read_text())
    est["entries"]["relu/k2_simple"]["flops"] = 1.0
    est_path.write_text(json.dumps(est))
    with monkeypatch.context() as m:
        _no_recompute(m)
        recounted = mvf.main(args + ["--recount", "relu/k2_simple"])
    assert recounted["entries"]["relu/k2_simple"] == data["entries"]["relu/k2_simple"]
    stored = json.loads(est_path.read_text())["entries"]["relu/k2_simple"]
    assert stored["flops"] == data["entries"]["relu/k2_simple"]["flops"]

    # an interrupted run (one variant missing from both stores) computes exactly the missing one;
    # a variant whose estimates are stored is only rescored
    missing, rescored = (f"relu/{c.name}" for c in mvf.variants(cfg)[-2:])
    est = json.loads(est_path.read_text())
    del saved["entries"][missing], saved["entries"][rescored], est["entries"][missing]
    (tmp_path / "mse_vs_flops_smoke.json").write_text(json.dumps(saved))
    est_path.write_text(json.dumps(est))
    calls = []
    real = mvf.run_variant
    monkeypatch.setattr(mvf, "run_variant", lambda *a: calls.append(a[3].name) or real(*a))
    resumed = mvf.main(args)
    assert calls == [missing.split("/")[1]]
    for key in (missing, rescored):
        assert resumed["entries"][key]["mse"] == pytest.approx(data["entries"][key]["mse"], rel=1e-9)


def test_refused_variant_is_skipped_with_reason(monkeypatch, tmp_path):
    # the memory guard in propagate raises MemoryError: recorded as skipped, not a crash
    monkeypatch.setattr(memory, "available_bytes", lambda: 1)
    cfg = dict(estimator_dtype="float64")
    spec = mvf.make_spec(4, 2, "relu")
    params = mvf.networks(dict(networks=2), spec)
    r = mvf.run_variant(cfg, spec, params, cj.PropagationConfig(k_max=2, output_degree=1))
    assert r["status"] == "skipped" and "MemoryError" in r["reason"]
    assert "skipped" in mvf.fmt_row(dict(estimator="k2_simple", **r))
    # a variant excluded on the command line is recorded as skipped without running
    monkeypatch.setattr(mvf, "run_variant", None)
    store = mvf.ResultStore(str(tmp_path / "s.json"))
    truth = (np.zeros((2, 4)), np.ones((2, 4)), 10, 0.0)
    r = mvf.evaluate(
        store,
        "relu/k4_simple_fac",
        cfg,
        spec,
        params,
        truth,
        cj.PropagationConfig(k_max=4, factored=True),
        exclude="k4_.*fac",
    )
    assert r["status"] == "skipped" and "excluded" in r["reason"] and store["relu/k4_simple_fac"] == r
    # ... but excluding a variant that already has a score keeps that score
    ok = dict(estimator="k4_augment_fac", status="ok", mse=1.0)
    store.put("relu/k4_augment_fac", ok)
    r = mvf.evaluate(
        store,
        "relu/k4_augment_fac",
        cfg,
        spec,
        params,
        truth,
        cj.PropagationConfig(k_max=4, kind="augment", factored=True),
        exclude="k4_.*fac",
    )
    assert r == ok and mvf.ResultStore(str(tmp_path / "s.json"))["relu/k4_augment_fac"] == ok


def test_interrupted_variant_resumes_after_its_finished_networks(monkeypatch, tmp_path):
    # one network per group (tiny vmap budget): an interrupt after the first group keeps its
    # estimate, and the rerun computes only the remaining networks, to the same result
    cfg = dict(estimator_dtype="float64", vmap_bytes=1, xla_flops=False)
    spec = mvf.make_spec(4, 2, "relu")
    params = mvf.networks(dict(networks=3), spec)
    config = cj.PropagationConfig(k_max=2, output_degree=1)
    full = mvf.run_variant(cfg, spec, params, config)
    assert full["status"] == "ok" and full["vmap_batch"] == 1 and full["estimates"].shape == (3, 4)
    store = mvf.ResultStore(str(tmp_path / "est.json"))
    real, calls = jax.block_until_ready, []

    def interrupt_second(x):  # the second finished group of networks (compilations are waited on too)
        if isinstance(x, jax.Array):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
        return real(x)

    with monkeypatch.context() as m:
        m.setattr(jax, "block_until_ready", interrupt_second)
        with pytest.raises(KeyboardInterrupt):
            mvf.run_variant(cfg, spec, params, config, (store, "relu/k2#partial"))
    saved = mvf.ResultStore(str(tmp_path / "est.json"))["relu/k2#partial"]
    assert saved["status"] == "partial" and len(saved["estimates"]) == 1
    calls.clear()
    store = mvf.ResultStore(str(tmp_path / "est.json"))
    with monkeypatch.context() as m:
        m.setattr(jax, "block_until_ready", lambda x: (isinstance(x, jax.Array) and calls.append(1)) or real(x))
        again = mvf.run_variant(cfg, spec, params, config, (store, "relu/k2#partial"))
    assert len(calls) == 2 and "relu/k2#partial" not in store
    np.testing.assert_allclose(again["estimates"], full["estimates"], rtol=1e-12, atol=0)


def test_bad_configs_raise_before_work(tmp_path):
    cfg = json.load(open(CFG("mse_vs_flops_smoke")))
    for bad in (dict(activations=["nope"]), dict(networks=1), dict(orders=[5]), dict(kinds=["other"])):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps({**cfg, **bad}))
        with pytest.raises(ValueError):
            mvf.main(["--config", str(path), "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="not in the config"):
        mvf.main(["--config", CFG("mse_vs_flops_smoke"), "--out", str(tmp_path), "--activations", "gelu,relu,sigmoid"])
    wcfg = json.load(open(CFG("mse_vs_width_smoke")))
    path = tmp_path / "badw.json"
    path.write_text(json.dumps({**wcfg, "widths": [8, 8]}))
    with pytest.raises(ValueError, match="widths"):
        mvw.main(["--config", str(path), "--out", str(tmp_path)])
    assert not (tmp_path / "gt_cache").exists()


def test_fit_slope_recovers_power_law():
    w = np.array([16, 32, 64, 128])
    f = mvw.fit_slope(w, 3.0 * w**-2.5)
    assert f["slope"] == pytest.approx(-2.5) and f["slope_se"] < 1e-6
    assert np.isnan(mvw.fit_slope(w[:2], w[:2] ** -1.0)["slope_se"])


def test_mse_vs_width_smoke_and_resume(tmp_path, monkeypatch):
    args = ["--config", CFG("mse_vs_width_smoke"), "--out", str(tmp_path), "--no-progress"]
    data = mvw.main(args)
    cfg = json.load(open(CFG("mse_vs_width_smoke")))
    summary = data["summary"]
    assert set(summary) == {c.name for c in mvf.variants(cfg)}
    for s in summary.values():
        assert [p["width"] for p in s["points"]] == cfg["widths"]
        for p in s["points"]:
            t = data["entries"][f"n{p['width']}/truth"]
            spec = mvf.make_spec(p["width"], cfg["layers"], cfg["activation"])
            assert t["forward_flops"] == cj.forward_flops(spec)
            # Monte Carlo at the estimator's FLOPs: variance / (flops / forward FLOPs)
            assert p["mc_matched_mse"] == pytest.approx(t["output_variance"] / (p["flops"] / t["forward_flops"]))
        fit = s["fit"]
        assert fit["widths"] == [p["width"] for p in s["points"] if p.get("resolved")]
        if len(fit["widths"]) >= 2:
            assert np.isfinite(fit["slope"]) and fit["slope"] < 0  # more width, less error
    assert (tmp_path / "mse_vs_width_smoke.png").stat().st_size > 0
    with monkeypatch.context() as m:
        _no_recompute(m)
        again = mvw.main(args)
    assert again["entries"] == data["entries"]
    assert json.dumps(again["summary"]) == json.dumps(summary)  # (json: nan == nan)


def test_config_init_draws_biases():
    cfg = dict(networks=2, init=dict(b_mean=0.1, b_var=0.1))
    spec = mvf.make_spec(4, 3, "tanh", mvf.init_of(cfg))
    params = mvf.networks(cfg, spec)
    assert spec.use_bias and not mvf.make_spec(4, 3, "tanh").use_bias
    leaves = jax.tree_util.tree_leaves_with_path(params)
    biases = [leaf for path, leaf in leaves if "bias" in jax.tree_util.keystr(path)]
    assert len(biases) == 3 and all(b.shape == (2, 4) for b in biases)
    draws = np.concatenate([np.ravel(b) for b in biases])  # N(0.1, 0.1) draws: mean within 4.5 standard errors
    assert abs(float(np.mean(draws)) - 0.1) < 4.5 * np.sqrt(0.1 / draws.size) and np.std(draws) > 0


def test_mse_vs_depth_smoke_and_resume(tmp_path, monkeypatch):
    import mse_vs_depth as mvd

    args = ["--config", CFG("mse_vs_depth_smoke"), "--out", str(tmp_path), "--no-progress"]
    data = mvd.main(args)
    cfg = json.load(open(CFG("mse_vs_depth_smoke")))
    L = cfg["layers"]
    names = {c.name for c in mvd.variants(cfg)}
    assert {"k1_simple_avg", "k3_simple_fac", "k3_simple_fac_avg"} <= names and "k2_simple_avg" not in names
    est = json.load(open(tmp_path / "mse_vs_depth_smoke_estimates.json"))["entries"]
    for w in cfg["widths"]:
        spec = mvf.make_spec(w, L, cfg["activation"], mvf.init_of(cfg))
        params = mvf.networks(cfg, spec)
        g = cj.Gaussian.standard(w, jax.numpy.float64)
        for config in mvd.variants(cfg):
            r = data["entries"][f"n{w}/{config.name}"]
            if mvd.excluded(cfg, w, config.name):
                assert r["status"] == "skipped"
                continue
            assert r["status"] == "ok" and [q["layer"] for q in r["layers"]] == list(range(L))
            # the stored per-layer estimates are the full network's layer means, and the last layer
            # is the plain output estimate with its FLOPs
            e = np.asarray(est[f"n{w}/{config.name}"]["estimates"])
            one = jax.tree_util.tree_map(lambda x: jax.numpy.asarray(x[1], jax.numpy.float64), params)
            np.testing.assert_allclose(e[1, -1], cj.estimate_mean(one, spec, g, config), rtol=1e-10, atol=1e-12)
            fl = est[f"n{w}/{config.name}"]["layer_flops"]
            assert fl[-1] == cj.estimator_flops(one, spec, g, config) and np.all(np.diff(fl) > 0)
            first = r["layers"][0]  # pre0 = x W_0 is Gaussian: every estimator is exact there
            assert not first["resolved"] and first["ratio_lower"] > 1
            for q in r["layers"]:
                sub = mvd.truncated(spec, q["layer"] + 1)
                assert sub.num_layers == q["layer"] + 1 and q["flops"] == fl[q["layer"]]
                assert q["forward_flops"] == cj.forward_flops(sub)
            exact = data["entries"].get(f"n{w}/{dataclasses.replace(config, rank_layers=None).name}", {})
            if config.rank_layers is not None and exact.get("status") == "ok":  # paired against exact
                assert [c["layer"] for c in r["truncation"]] == list(range(L))
                for c, q, qe in zip(r["truncation"], r["layers"], exact["layers"]):
                    d = np.mean(q["mse_per_network"]) - np.mean(qe["mse_per_network"])
                    assert c["delta"] == pytest.approx(d, rel=1e-9, abs=1e-15)
                assert r["truncation"][-1]["delta"] != 0  # the smoke net is deep enough to drop a block
    assert any("truncation" in r for r in data["entries"].values())
    assert (tmp_path / "mse_vs_depth_smoke.png").stat().st_size > 0
    with monkeypatch.context() as m:
        _no_recompute(m)
        again = mvd.main(args)
    assert json.dumps(again["entries"]) == json.dumps(data["entries"])
    with monkeypatch.context() as m:  # one width at a time into the same store
        _no_recompute(m)
        one = mvd.main(args + ["--widths", str(cfg["widths"][-1])])
    assert json.dumps(one["entries"]) == json.dumps(data["entries"])
    with pytest.raises(ValueError, match="among the config's widths"):
        mvd.main(args + ["--widths", "9"])
    # one variant alone into a fresh store (after the cached ground truth): the same row as the
    # full run's, and no other variant in it
    only = tmp_path / "only"
    only.mkdir()
    (only / "gt_cache").symlink_to(tmp_path / "gt_cache")
    key = f"n{cfg['widths'][0]}/k3_simple_fac"
    got = mvd.main(["--config", CFG("mse_vs_depth_smoke"), "--out", str(only), "--no-progress", "--only", f"^{key}$"])
    assert {k for k in got["entries"] if not k.endswith("/truth")} == {key}
    assert json.dumps(got["entries"][key]["layers"]) == json.dumps(data["entries"][key]["layers"])


def test_truncation_cost_closed_form():
    """(t - g)^2 - (e - g)^2 per coordinate, averaged; relative to the exact excess."""
    import mse_vs_depth as mvd

    g = np.zeros((2, 2, 3))
    e = np.ones_like(g)
    t = e + np.array([0.5, 1.0])[:, None, None]  # network 0: +0.5, network 1: +1
    rows = [dict(resolved=True, excess=2.0), dict(resolved=False, excess=0.1)]
    c = mvd.truncation_cost(t, e, g, rows)
    delta = np.mean([1.5**2 - 1, 2.0**2 - 1])
    assert c[0]["delta"] == pytest.approx(delta) and c[0]["rel"] == pytest.approx(delta / 2.0)
    assert c[0]["delta_se"] == pytest.approx(np.std([1.25, 3.0], ddof=1) / np.sqrt(2))
    assert np.isnan(c[1]["rel"])  # no resolved exact MSE to compare with


def test_mse_vs_depth_scores_a_diverged_layer():
    """A layer where an estimate is not finite: infinite error, sampling wins there, left out of
    the fit, and never offered by the advice table."""
    import advice_table
    import mse_vs_depth as mvd

    B, L, n, N = 3, 4, 8, 4096
    spec = mvf.make_spec(n, L, "relu")
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(B, L, n))
    sem = np.full((B, L, n), 1e-3)
    est = mean + 0.1 * (np.arange(L)[None, :, None] + 1) * rng.normal(size=(B, L, n))  # resolved, growing
    est[1, 3, 2] = np.nan  # network 1 diverges at the last layer
    fl = [1e3 * (l + 1) for l in range(L)]
    rows = mvd.score({}, spec, est, (mean, sem, N, 0.0), fl)
    assert [r.get("diverged", 0) for r in rows] == [0, 0, 0, 1]
    last = rows[-1]
    assert last["excess"] == np.inf and last["ratio_high"] == 0.0 and last["output_variance"] == pytest.approx(1e-6 * N)
    s = mvd.summarize(rows)
    assert s["first_layer_diverged"] == 3 and s["fit"]["layers"] == [0, 1, 2]
    assert s["first_layer_sampling_wins"] is not None and s["first_layer_sampling_wins"] <= 3
    mvd.print_row(dict(estimator="x", status="ok", layers=rows, **s))  # prints, does not fail on inf
    meta = dict(name="t", layers=L, widths=[n], activation="relu", networks=B, gt_samples=N)
    table = advice_table.build(dict(meta=meta, entries={f"n{n}/x": dict(status="ok", layers=rows)}))
    assert table["variants"]["x"][str(n)]["mse"][3] is None and table["variants"]["x"][str(n)]["mse"][2] > 0
    names = {o.name for o in cj.advise(n, L, 1e12, table).options}
    assert "x" not in names and "x" in {o.name for o in cj.advise(n, L - 1, 1e12, table).options}
