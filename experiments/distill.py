"""Mechanistic distillation: train a student MLP through the cumulant estimate, against the same
training driven by sampled losses at equal FLOPs per step.

Problem (per seed): a teacher MLP f and a student g of the same shape (independent He inits,
biases), input x ~ N(0, I). The student minimises the moment-matching loss

    L = ||E[g(x)] - mu*||^2 + ||Cov[g(x)] - Sigma*||_F^2

where (mu*, Sigma*) are the teacher's output mean and covariance from a large Monte Carlo run
(``teacher_samples``; their standard errors are recorded). Runs, all Adam with the same learning
rate schedule, the same initial student and the same number of steps:

* ``est_<estimator>``: gradients of L at the cumulant-propagation estimate of the student's output
  moments (:func:`cumjax.train.estimated_loss`); no samples anywhere in the loss.
* ``mc_<estimator>``: pathwise gradients of an unbiased minibatch estimate of L
  (:func:`cumjax.train.sampled_loss`) with the batch size chosen so that one step costs the same
  FLOPs as the estimator's step. FLOPs are XLA's count of the compiled gradient
  (:func:`cumjax.compiled_flops` of ``jax.grad(loss)``; the estimator unrolled over layers so every
  layer is counted; the sampled loss on a fixed input batch, so drawing the inputs and the
  optimizer update, identical for both, are not counted).

Every ``eval_every`` steps the student's true L is measured by an independent Monte Carlo run
(``eval_samples`` in ``eval_groups`` groups: unbiased U-statistic with a jackknife standard error,
:func:`cumjax.train.monte_carlo_loss`; the same evaluation samples for every run at a given step).

    python experiments/distill.py --config configs/distill_smoke.json --out results/

Writes ``<out>/distill_<name>.json`` after every finished run (a rerun skips them) and
``<out>/distill_<name>.png`` (learning curves vs cumulative FLOPs); runs in progress checkpoint to
``<out>/distill_<name>_ckpt/`` every ``eval_every`` steps and resume from there.
"""

from __future__ import annotations

import argparse
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import ResultStore, enable_x64, load_config, network, save_figure_atomic

import cumjax as cj
from cumjax import train as tr

REQUIRED = (
    "input_dim",
    "width",
    "output_dim",
    "layers",
    "activation",
    "seeds",
    "estimators",
    "steps",
    "eval_every",
    "lr",
    "teacher_samples",
    "eval_samples",
    "eval_groups",
)
_EST = re.compile(r"^k([1-4])_(simple|augment)$")


def check_config(cfg: dict) -> None:
    """Raise ValueError on a config that cannot run, before any heavy work."""
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"config {cfg.get('name')!r} lacks {missing}")
    if cfg["activation"] not in cj.ACTIVATIONS:
        raise ValueError(f"unknown activation {cfg['activation']!r}; choose from {cj.ACTIVATIONS}")
    for e in cfg["estimators"]:
        if not _EST.match(e):
            raise ValueError(f"estimator {e!r} must look like k<1-4>_<simple|augment>, e.g. k2_simple")
    if not cfg["seeds"]:
        raise ValueError("need at least one seed")
    if int(cfg["steps"]) % int(cfg["eval_every"]):
        raise ValueError(f"steps ({cfg['steps']}) must be a multiple of eval_every ({cfg['eval_every']})")
    if int(cfg["eval_groups"]) < 3 or int(float(cfg["eval_samples"])) // int(cfg["eval_groups"]) < 2:
        raise ValueError("need eval_groups >= 3 and >= 2 eval samples per group")
    if cfg.get("schedule", "cosine") not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {cfg.get('schedule')!r}")
    _network(cfg, 0)  # a bad shape or init raises here


def _network(cfg: dict, seed: int) -> tuple[cj.MLPSpec, dict]:
    """``(spec, float32 params)`` of a He network with biases (trainable even at ``bias_var`` 0)."""
    init = cj.Init(kind="he", b_var=float(cfg.get("bias_var", 0.1)))
    shape = dict(input_dim=cfg["input_dim"], output_dim=cfg["output_dim"], use_bias=True)
    return network(seed, cfg["width"], cfg["layers"], cfg["activation"], init, jnp.float32, **shape)


def estimator_config(name: str) -> cj.PropagationConfig:
    k, kind = _EST.match(name).groups()
    return cj.PropagationConfig(k_max=int(k), kind=kind, output_degree=2)


class Problem:
    """One seed's teacher, initial student, input and jitted losses (float32 params)."""

    def __init__(self, cfg: dict, seed: int):
        self.cfg, self.seed = cfg, seed
        self.spec, self.teacher = _network(cfg, 1000 + seed)
        _, self.student = _network(cfg, 2000 + seed)
        self.gaussian = cj.Gaussian.standard(self.spec.input_dim, jnp.float32)
        self.target = None

    def set_target(self, entry: dict) -> None:
        self.target = tr.Moments(jnp.asarray(entry["mean"], jnp.float32), jnp.asarray(entry["cov"], jnp.float32))

    def teacher_moments(self) -> dict:
        """Teacher output moments from ``teacher_samples`` (in ``eval_groups`` groups, averaged:
        each group's mean and ddof-1 covariance are unbiased, so their averages are too; with
        ``teacher_samples == eval_samples`` this reuses the evaluation's compiled sampler)."""
        n, groups = int(float(self.cfg["teacher_samples"])), int(self.cfg["eval_groups"])
        m = tr.monte_carlo_moments(
            jax.random.PRNGKey(3000 + self.seed),
            self.teacher,
            self.spec,
            self.gaussian,
            n,
            groups,
            chunk_size=self.cfg.get("chunk"),
        )
        mean, cov = np.asarray(m.mean, np.float64).mean(0), np.asarray(m.cov, np.float64).mean(0)
        return dict(mean=mean.tolist(), cov=cov.tolist(), samples=n, mean_se=np.sqrt(np.diag(cov) / n).tolist())

    @property
    def data(self) -> tr.MomentProblem:
        return tr.MomentProblem(self.target, self.gaussian)

    def evaluate(self, params, step):
        key = jax.random.fold_in(jax.random.PRNGKey(4000 + self.seed), step)  # same samples for every run at a step
        return tr.monte_carlo_loss(
            key,
            params,
            self.spec,
            self.gaussian,
            self.target,
            int(float(self.cfg["eval_samples"])),
            int(self.cfg["eval_groups"]),
            chunk_size=self.cfg.get("chunk"),
        )


def measure_flops(problem: Problem, estimators) -> dict:
    """Per estimator: XLA FLOPs of one gradient of the estimated loss and the minibatch whose
    sampled-loss gradient costs the same. The sampled gradient's cost is affine in the batch, so
    XLA's counts at two batch sizes give its per-sample and fixed parts exactly."""
    cfg, p = problem.cfg, problem.student
    ref = int(cfg.get("flops_ref_batch", 1024))
    x = tr.gaussian_batch(jax.random.PRNGKey(0), problem.gaussian, ref)
    grad_mc = jax.grad(lambda q, x: tr.sampled_loss(q, problem.spec, x, problem.target))
    big, small = cj.compiled_flops(grad_mc, p, x), cj.compiled_flops(grad_mc, p, x[: ref // 2])
    per_sample = (big - small) / (ref - ref // 2)
    fixed = big - per_sample * ref
    out = dict(
        mc_per_sample=per_sample,
        mc_fixed=fixed,
        mc_per_sample_analytic=3.0 * cj.forward_flops(problem.spec),
        forward_per_sample=float(cj.forward_flops(problem.spec)),
        estimators={},
    )
    for name in estimators:
        config = estimator_config(name)

        def unrolled(q, config=config):  # every layer traced, so XLA counts every layer
            return tr.estimated_loss(q, problem.spec, problem.gaussian, config, problem.target, unroll=True)

        grad_flops = cj.compiled_flops(jax.grad(unrolled), p)
        batch = max(int(cfg.get("min_batch", 4)), 2 * int(round((grad_flops - fixed) / per_sample / 2)))
        row = dict(grad_flops=grad_flops, batch=batch, mc_step_flops=fixed + per_sample * batch)
        if cfg.get("forward_flops", False):  # the mean-only forward estimate, for the backward/forward ratio
            row["forward_mean_flops"] = cj.estimator_flops(p, problem.spec, problem.gaussian, config)
        out["estimators"][name] = row
        print(
            f"  {name}: estimator gradient {grad_flops:.3g} FLOPs"
            + (f" (mean-only forward {row['forward_mean_flops']:.3g})" if "forward_mean_flops" in row else "")
            + f"; matched Monte Carlo batch {batch} ({row['mc_step_flops']:.3g} FLOPs/step)"
        )
    return out


@functools.cache  # one object per setting: fit's compiled steps are shared across seeds
def optimizer(lr: float, schedule: str, steps: int) -> optax.GradientTransformation:
    return optax.adam(optax.cosine_decay_schedule(lr, steps) if schedule == "cosine" else lr)


def run(problem: Problem, kind: str, name: str, flops: dict, ckpt_dir: str) -> dict:
    cfg = problem.cfg
    e = flops["estimators"][name]
    if kind == "est":
        loss_fn, per_step = tr.estimated_objective(problem.spec, estimator_config(name)), e["grad_flops"]
    else:
        loss_fn, per_step = tr.sampled_objective(problem.spec, e["batch"]), e["mc_step_flops"]
    label = f"{kind}_{name}_s{problem.seed}"
    meta = dict(
        run=label, lr=cfg["lr"], schedule=cfg.get("schedule", "cosine"), batch=e["batch"] if kind == "mc" else None
    )
    opt = optimizer(float(cfg["lr"]), cfg.get("schedule", "cosine"), int(cfg["steps"]))
    _, curve = tr.fit(
        loss_fn,
        problem.student,
        opt,
        int(cfg["steps"]),
        key=jax.random.PRNGKey(5000 + problem.seed),
        data=problem.data,
        eval_every=int(cfg["eval_every"]),
        evaluate=problem.evaluate,
        flops_per_step=per_step,
        checkpoint=os.path.join(ckpt_dir, label + ".msgpack"),
        meta=meta,
        progress=label,
    )
    final = curve[-1]
    print(
        f"  {label}: MC-evaluated loss {curve[0]['eval_loss']:.4g} -> {final['eval_loss']:.4g} "
        f"+- {final['eval_se']:.2g}"
    )
    return dict(
        curve=curve,
        final_loss=final["eval_loss"],
        final_se=final["eval_se"],
        flops_per_step=per_step,
        batch=e["batch"] if kind == "mc" else None,
    )


def summarise(cfg: dict, store: ResultStore) -> dict:
    """Final losses per run kind: mean over seeds with the standard error across seeds, and
    per-seed Monte Carlo standard errors; est/mc ratio per estimator."""
    out = {}
    for name in cfg["estimators"]:
        row = {}
        for kind in ("est", "mc"):
            runs = [store[f"{kind}_{name}/s{s}"] for s in cfg["seeds"] if f"{kind}_{name}/s{s}" in store]
            if not runs:
                continue
            finals = np.array([r["final_loss"] for r in runs])
            own = np.array([r["curve"][-1]["train_loss"] for r in runs])  # the loss the run itself saw last
            se_seeds = float(finals.std(ddof=1) / np.sqrt(len(finals))) if len(finals) > 1 else None
            row[kind] = dict(
                final_mean=float(finals.mean()),
                final_own_loss_mean=float(own.mean()),
                final_se_seeds=se_seeds,
                final_mc_se=float(np.sqrt(np.sum(np.square([r["final_se"] for r in runs]))) / len(runs)),
                finals=finals.tolist(),
                flops_per_step=runs[0]["flops_per_step"],
                batch=runs[0]["batch"],
            )
        if "est" in row and "mc" in row:
            row["est_over_mc"] = row["est"]["final_mean"] / row["mc"]["final_mean"]
        out[name] = row
    return out


def plot(cfg: dict, store: ResultStore, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(cfg["estimators"]):
        for kind, style in (("est", "-"), ("mc", "--")):
            runs = [store[f"{kind}_{name}/s{s}"] for s in cfg["seeds"] if f"{kind}_{name}/s{s}" in store]
            if not runs:
                continue
            flops = np.array([r["flops"] for r in runs[0]["curve"]])
            losses = np.array([[r["eval_loss"] for r in run["curve"]] for run in runs])
            mean = losses.mean(0)
            if len(runs) > 1:
                se = losses.std(0, ddof=1) / np.sqrt(len(runs))
            else:
                se = np.array([r["eval_se"] for r in runs[0]["curve"]])
            label = f"{name} estimator" if kind == "est" else f"sampling, batch {runs[0]['batch']} (= {name} FLOPs)"
            keep = flops > 0  # log axis: the shared initial point is drawn at the first checkpoint's x
            ax.errorbar(
                flops[keep],
                np.maximum(mean[keep], 1e-12),
                yerr=se[keep],
                fmt=style,
                color=colors[i % len(colors)],
                marker="o" if kind == "est" else "s",
                ms=3,
                capsize=2,
                label=label,
            )
    first = [store[k]["curve"][0]["eval_loss"] for k in store.entries if k.startswith("est_")]
    if first:
        ax.axhline(np.mean(first), ls=":", color="gray", lw=1, label="initial student")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cumulative training FLOPs (XLA count of the gradient)")
    ax.set_ylabel("moment-matching loss (independent Monte Carlo)")
    ax.set_title(
        f"distillation, {cfg['activation']} width {cfg['width']}, {cfg['layers']} layers, {len(cfg['seeds'])} seeds"
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--config",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "distill_smoke.json"),
    )
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    check_config(cfg)
    enable_x64()  # float64 Monte Carlo sums; params and losses stay float32
    base = os.path.join(args.out, cfg["name"])  # the config file stem, e.g. distill_smoke
    store = ResultStore(base + ".json", meta={k: v for k, v in cfg.items() if k != "name"})
    print(f"device: {jax.devices()[0]}  config: {cfg['name']}")
    for seed in cfg["seeds"]:
        problem = Problem(cfg, seed)
        problem.set_target(store.get_or_compute(f"teacher/s{seed}", problem.teacher_moments))
        flops = store.get_or_compute("flops", lambda: measure_flops(problem, cfg["estimators"]))
        for name in cfg["estimators"]:
            for kind in ("est", "mc"):
                store.get_or_compute(f"{kind}_{name}/s{seed}", lambda: run(problem, kind, name, flops, base + "_ckpt"))
    summary = summarise(cfg, store)
    store.data["summary"] = summary
    store.put("done", True)
    plot(cfg, store, base + ".png")
    print(
        f"\nfinal moment-matching loss (Monte Carlo, mean over {len(cfg['seeds'])} seeds +- SE across seeds, "
        "or the Monte Carlo SE for one seed):"
    )
    print(
        f"{'estimator':>12}{'FLOPs/step':>12}{'through estimator':>24}{'(its own estimate)':>20}{'MC batch':>10}"
        f"{'sampled, equal FLOPs':>24}{'est / sampled':>15}"
    )
    for name, row in summary.items():
        fmt = lambda r: f"{r['final_mean']:.4g} +- {r['final_se_seeds'] or r['final_mc_se']:.2g}"  # noqa: E731
        est, mc = row["est"], row["mc"]
        print(
            f"{name:>12}{est['flops_per_step']:>12.3g}{fmt(est):>24}{est['final_own_loss_mean']:>20.3g}"
            f"{mc['batch']:>10}{fmt(mc):>24}{row['est_over_mc']:>15.3g}"
        )
    print(f"wrote {base}.json and {base}.png")
    return store.data


if __name__ == "__main__":
    main()
