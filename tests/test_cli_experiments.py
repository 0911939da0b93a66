"""The CLI and the experiment scripts run end to end on small configurations."""

import json
import os
import stat

import pytest

from cumjax import cli

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_compare_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = cli.main(
        [
            "compare",
            "--width",
            "16",
            "--layers",
            "3",
            "--orders",
            "1,2",
            "--samples",
            "20000",
            "--chunk",
            "4096",
            "--activation",
            "tanh",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "k2_simple" in text and "monte_carlo_20000" in text
    assert stat.S_IMODE(os.stat(out).st_mode) & 0o044 == 0o044  # readable by others, not mkstemp's 0600
    result = json.loads(out.read_text())
    rows = {r["estimator"]: r for r in result["rows"]}
    assert set(rows) >= {"k1_simple", "k2_augment", "k2_simple", "monte_carlo_20000"} and not result["refused"]
    assert all(r["flops"] > 0 and r["run_s"] >= 0 for r in rows.values())
    # the Monte Carlo row reports its own sampling error (mean squared standard error)
    assert rows["monte_carlo_20000"]["mse"] == pytest.approx(result["ground_truth_se2"])


def test_compare_factored_k3(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert (
        cli.main(
            [
                "compare",
                "--width",
                "8",
                "--layers",
                "3",
                "--orders",
                "3",
                "--kinds",
                "simple",
                "--factored",
                "--samples",
                "4096",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert {r["estimator"] for r in json.loads(out.read_text())["rows"]} == {"k3_simple_fac", "monte_carlo_4096"}


def test_compare_keeps_the_rows_it_can_compute(tmp_path, capsys, monkeypatch):
    """A refused configuration (an invalid order, or one the memory model refuses) is reported
    before any sampling and skipped; the other rows are computed, printed and written (exit 3)."""
    from cumjax import memory

    real = memory.estimated_bytes
    monkeypatch.setattr(memory, "estimated_bytes", lambda w, L, c, i=4: 2**60 if c.k_max == 2 else real(w, L, c, i))
    out = tmp_path / "r.json"
    code = cli.main(
        [
            "compare",
            "--width",
            "8",
            "--layers",
            "3",
            "--orders",
            "1,2,5",
            "--kinds",
            "simple",
            "--samples",
            "4096",
            "--json",
            str(out),
        ]
    )
    assert code == 3
    text = capsys.readouterr().out
    assert text.index("refused k5_simple") < text.index("refused k2_simple") < text.index("Monte Carlo ground truth")
    assert "k_max must be" in text and "GiB" in text
    result = json.loads(out.read_text())
    assert [r["estimator"] for r in result["rows"]] == ["k1_simple", "monte_carlo_4096"]
    assert {r["estimator"] for r in result["refused"]} == {"k5_simple", "k2_simple"}


def test_compare_rejects_bad_arguments_before_work(capsys):
    assert cli.main(["compare", "--width", "0", "--samples", "100"]) == 2
    assert "dimensions" in capsys.readouterr().err
    assert cli.main(["compare", "--width", "8", "--samples", "1"]) == 2
    assert "num_samples" in capsys.readouterr().err


def test_x64_changes_only_the_precision(capsys):
    """--x64 computes in float64 on the same network: the MSEs agree to float32 rounding."""
    rows = {}
    for flag in ([], ["--x64"]):
        args = ["compare", "--width", "8", "--layers", "3", "--orders", "2", "--kinds", "simple", "--samples", "4096"]
        assert cli.main(args + flag) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("k2_simple"))
        rows[bool(flag)] = float(line.split()[1])
    assert rows[True] == pytest.approx(rows[False], rel=1e-3)


def test_bench_orders_smoke(tmp_path):
    import bench_orders

    results = bench_orders.main(
        ["--config", os.path.join(ROOT, "configs", "bench_orders_smoke.json"), "--out", str(tmp_path)]
    )
    assert set(results) >= {"timing", "compile", "accuracy", "mse_slopes", "timing_slopes"}
    saved = json.loads((tmp_path / "bench_orders_smoke.json").read_text())
    assert saved["accuracy"].keys() == results["accuracy"].keys()
    # resume: a second run finds everything done and recomputes nothing
    again = bench_orders.main(
        ["--config", os.path.join(ROOT, "configs", "bench_orders_smoke.json"), "--out", str(tmp_path)]
    )
    assert again["accuracy"] == results["accuracy"]


def test_compare_with_critical_init_and_biases(capsys):
    # critical init draws biases: the CLI must build a spec with biases for it
    assert (
        cli.main(
            [
                "compare",
                "--width",
                "8",
                "--layers",
                "3",
                "--orders",
                "1,2",
                "--kinds",
                "simple",
                "--samples",
                "4096",
                "--activation",
                "tanh",
                "--init",
                "critical",
                "--q-star",
                "1.0",
            ]
        )
        == 0
    )
    assert "critical" in capsys.readouterr().out


def test_bench_depth_smoke_and_resume(tmp_path, monkeypatch):
    import bench_depth

    args = ["--config", os.path.join(ROOT, "configs", "bench_depth_smoke.json"), "--out", str(tmp_path)]
    data = bench_depth.main(args)
    cfg = json.load(open(os.path.join(ROOT, "configs", "bench_depth_smoke.json")))
    names = [c.name for c in bench_depth.variants(cfg)]
    assert names == ["k3_simple_fac", "k3_simple_fac1"]
    for name in names:
        rows = [data["entries"][f"{name}/L{L}"] for L in cfg["depths"]]
        assert rows[0]["ratio_to_shallowest"] == 1.0
        for L, r in zip(cfg["depths"], rows):
            assert r["per_layer_s"] == pytest.approx(r["run_s"] / (L - 1)) and r["compile_s"] > 0
    monkeypatch.setattr(bench_depth, "time_compiled", lambda *a, **k: pytest.fail("recomputed a stored time"))
    assert bench_depth.main(args)["entries"] == data["entries"]


def test_bench_memory_smoke_compares_model_with_xla_and_resumes(tmp_path, monkeypatch):
    import bench_memory

    args = ["--config", os.path.join(ROOT, "configs", "bench_memory_smoke.json"), "--out", str(tmp_path)]
    data = bench_memory.main(args)
    keys = sorted(k for k in data["entries"] if k != "done")
    assert keys == [
        "k2_augment/n8/L3/float32",
        "k3_simple_fac/n8/L3/float32",
        "k3_simple_fac/n8/L3/float32/memory-scheduler",
        "k4_simple_fac/n8/L3/float64",
    ]
    for k in keys:
        r = data["entries"][k]
        assert r["xla_bytes"] > 0 and r["ratio"] == pytest.approx(r["model_bytes"] / r["xla_bytes"])
    # the float64 program holds at least the float64 weights (3 layers of 8 x 8 plus biases)
    assert data["entries"]["k4_simple_fac/n8/L3/float64"]["xla_bytes"] >= 3 * 8 * 8 * 8
    monkeypatch.setattr(bench_memory, "xla_bytes", lambda *a: pytest.fail("recompiled a stored case"))
    assert bench_memory.main(args)["entries"] == data["entries"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "bad", "cases": [{"width": 8, "depth": 3, "k_max": 3, "scheduler": "fast"}]}))
    with pytest.raises(ValueError, match="unknown scheduler"):
        bench_memory.main(["--config", str(bad), "--out", str(tmp_path)])
