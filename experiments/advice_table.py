"""Build ``cumjax/data/advice.json`` (the table behind :func:`cumjax.advise`) from a finished
``mse_vs_depth`` run, and print the when-to-use table of the README.

    python experiments/advice_table.py --scores results/mse_vs_depth_full.json

Per variant and width: every layer's MSE (the resolved excess over the noise floor, or its upper
bound, flagged), the estimator's FLOPs at that depth, and per width the layer variances.
"""

from __future__ import annotations

import argparse
import json
import os

from common import write_json_atomic

import cumjax as cj

OUT = os.path.join(os.path.dirname(__file__), "..", "cumjax", "data", "advice.json")


def merge(old: dict, new: dict) -> dict:
    """``new`` plus every (variant, width) of ``old`` that ``new`` does not measure (a sweep run one
    width or one variant at a time, ``mse_vs_depth.py --widths`` / ``--only``); both from the same
    activation and depth (and so the same networks' layer variances)."""
    if (old["activation"], old["depth_max"]) != (new["activation"], new["depth_max"]):
        raise ValueError("--merge needs a table of the same activation and depth")
    out = dict(new, variance=dict(old["variance"], **new["variance"]), variants={})
    for name in dict.fromkeys([*old["variants"], *new["variants"]]):
        out["variants"][name] = dict(old["variants"].get(name, {}), **new["variants"].get(name, {}))
    return out


def build(scores: dict) -> dict:
    meta, entries = scores["meta"], scores["entries"]
    L = int(meta["layers"])
    table = dict(
        source=f"experiments/mse_vs_depth.py, config {meta['name']!r}: {meta['activation']}, He init, N(0, I), "
        f"{meta['networks']} networks per width, ground truth {meta['gt_samples']} samples",
        activation=meta["activation"],
        depth_max=L,
        variance={},
        variants={},
    )
    for w in meta["widths"]:
        rows = {k.split("/", 1)[1]: v for k, v in entries.items() if k.startswith(f"n{w}/")}
        for name, r in rows.items():
            if name == "truth" or r.get("status") != "ok":
                continue
            layers = r["layers"]
            table["variance"].setdefault(str(w), [q["output_variance"] for q in layers])
            table["variants"].setdefault(name, {})[str(w)] = dict(
                # null where the estimator diverged: cj.advise never offers it there
                mse=[None if q.get("diverged") else q["excess"] if q["resolved"] else q["mse_upper"] for q in layers],
                bound=[not q["resolved"] for q in layers],
                flops=[q["flops"] for q in layers],
            )
    return table


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scores", required=True, help="a mse_vs_depth_<name>.json")
    p.add_argument("--out", default=OUT)
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the (variant, width) entries of the existing --out table the scores lack",
    )
    p.add_argument("--budgets", default="1e6,1e8,1e10,1e12")
    p.add_argument("--depths", default="2,4,8,16")
    args = p.parse_args(argv)
    with open(args.scores) as f:
        table = build(json.load(f))
    if args.merge and os.path.exists(args.out):
        with open(args.out) as f:
            table = merge(json.load(f), table)
    write_json_atomic(table, args.out)
    budgets = [float(b) for b in args.budgets.split(",")]
    depths = [int(d) for d in args.depths.split(",") if int(d) <= table["depth_max"]]
    print("| width | depth | " + " | ".join(f"{b:.0e} FLOPs" for b in budgets) + " |")
    print("|---|---|" + "---|" * len(budgets))
    for w in sorted(int(w) for w in table["variance"]):
        for d in depths:
            cells = []
            for b in budgets:
                try:
                    a = cj.advise(w, d, b, table)
                    star = "*" if a.best.extrapolated else ""  # outside the widths it was measured at
                    cells.append(f"{a.best.name}{star} ({'<' if a.best.bound else ''}{a.best.mse:.1e})")
                except ValueError:
                    cells.append("–")
            print(f"| {w} | {d} | " + " | ".join(cells) + " |")
    print(f"\nwrote {args.out}")
    return table


if __name__ == "__main__":
    main()
