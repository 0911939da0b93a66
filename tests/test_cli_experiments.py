"""The CLI and the experiment scripts run end to end on small configurations."""
import json
import os
import sys

import pytest

from cumjax import cli

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_compare_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = cli.main(["compare", "--width", "16", "--layers", "3", "--orders", "1,2", "--samples", "20000",
                     "--chunk", "4096", "--activation", "tanh", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "k2_simple" in text and "monte_carlo_20000" in text
    result = json.loads(out.read_text())
    rows = {r["estimator"]: r for r in result["rows"]}
    assert set(rows) >= {"k1_simple", "k2_augment", "k2_simple", "monte_carlo_20000"}
    assert all(r["flops"] > 0 and r["run_s"] >= 0 for r in rows.values())
    # the Monte Carlo row reports its own sampling error (mean squared standard error)
    assert rows["monte_carlo_20000"]["mse"] == pytest.approx(result["ground_truth_se2"])


def test_compare_factored_k3(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli.main(["compare", "--width", "8", "--layers", "3", "--orders", "3", "--kinds", "simple", "--factored",
                     "--samples", "4096", "--json", str(out)]) == 0
    assert {r["estimator"] for r in json.loads(out.read_text())["rows"]} == {"k3_simple_fac", "monte_carlo_4096"}


def test_compare_rejects_bad_configuration(capsys):
    assert cli.main(["compare", "--width", "8", "--layers", "2", "--orders", "5", "--samples", "100"]) == 2
    assert "k_max" in capsys.readouterr().err


def test_bench_orders_smoke(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import bench_orders

    results = bench_orders.main(["--config", os.path.join(ROOT, "configs", "bench_orders_smoke.json"), "--out", str(tmp_path)])
    assert set(results) >= {"timing", "compile", "accuracy", "mse_slopes", "timing_slopes"}
    saved = json.loads((tmp_path / "bench_orders_smoke.json").read_text())
    assert saved["accuracy"].keys() == results["accuracy"].keys()
    # resume: a second run finds everything done and recomputes nothing
    again = bench_orders.main(["--config", os.path.join(ROOT, "configs", "bench_orders_smoke.json"), "--out", str(tmp_path)])
    assert again["accuracy"] == results["accuracy"]


def test_compare_with_critical_init_and_biases(capsys):
    # critical init draws biases: the CLI must build a spec with biases for it
    assert cli.main(["compare", "--width", "8", "--layers", "3", "--orders", "1,2", "--kinds", "simple", "--samples", "4096",
                     "--activation", "tanh", "--init", "critical", "--q-star", "1.0"]) == 0
    assert "critical" in capsys.readouterr().out
