"""The low-rank factored k=3/4 estimator: reference goldens through the factored path, the
factored tensor's algebra, jit/vmap/grad, rank and memory model."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from goldens import golden_arrays, golden_files, ids, load, meta_of

import cumjax as cj
from cumjax import diagrams as dg
from cumjax import lowrank, memory
from cumjax.config import PropagationConfig
from cumjax.lowrank import FactoredTensor, contract, refactor
from cumjax.memory import estimated_bytes, factored_ranks
from cumjax.nonlinear import zero_coincident

FACTORED_GOLDENS = [p for p in golden_files() if meta_of(p)["factor"] and meta_of(p)["k_max"] >= 3]
FAST = ("cases/p016", "cases/p017", "cases/p018")  # k3 simple/augment, k4 simple; k4 augment: 30-100 s each


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(p, marks=[] if any(s in p for s in FAST) else [pytest.mark.slow], id=i)
        for p, i in zip(FACTORED_GOLDENS, ids(FACTORED_GOLDENS))
    ],
)
def test_factored_golden_through_low_rank_path(path):
    spec, params, gaussian, config, meta, arrays = load(path)
    k = config.k_max
    assert config.is_factored
    out = jax.jit(lambda p: cj.propagate(p, spec, gaussian, config))(params)
    # The top degree is carried in low-rank form from the first hidden layer on.
    for l in range(meta["num_layers"] - 1):
        top = out[f"act{l}"][k]
        assert (
            isinstance(top, FactoredTensor) and top.rank == factored_ranks(meta["width"], meta["num_layers"], config)[l]
        )
    checked = 0
    for key, label, d, golden in golden_arrays(arrays):
        err = np.abs(np.asarray(out.dense(label, d)) - golden).max()
        assert err <= 1e-9 * np.abs(golden).max() + 1e-12, f"{key}: max abs err {err:.3e}"
        checked += 1
    assert checked


# ----------------------------------------------------------------------------- the tensor itself


def _random_factored(k, n, R, key):
    ks = jax.random.split(key, 3)
    if k == 3:
        return FactoredTensor([jax.random.normal(ks[i], (n, R)) for i in range(3)], (1, 1, 1), n)
    B = jax.random.normal(ks[2], (R, n, n))  # rank-major
    return FactoredTensor(
        [jax.random.normal(ks[0], (n, R)), jax.random.normal(ks[1], (n, R)), B + jnp.swapaxes(B, 1, 2)], (1, 1, 2), n
    )


def _explicit(F):
    """Sym(sum_r outer products) by brute force over all permutations of the d legs."""
    import itertools
    import math

    letters, subs = iter("abcdefgh"), []
    for l in F.legs:  # (n, R) vectors, rank-major (R, n, n) matrices
        own = "".join(next(letters) for _ in range(l))
        subs.append("r" + own if l == 2 else own + "r")
    t = np.einsum(
        ",".join(subs) + "->" + "".join(c for s in subs for c in s.replace("r", "")), *map(np.asarray, F.parts)
    )
    d = t.ndim
    return sum(np.transpose(t, p) for p in itertools.permutations(range(d))) / math.factorial(d)


@pytest.mark.parametrize("k", [3, 4])
def test_factored_slices_linear_step_and_refactor(k):
    n, R = 5, 3
    F = _random_factored(k, n, R, jax.random.PRNGKey(k))
    dense = _explicit(F)
    np.testing.assert_allclose(F.dense(), dense, rtol=1e-12, atol=1e-12)
    # Slices at distinct neurons, e.g. (2,1) -> T[i,i,j].
    s = np.asarray(F.slice((2,) + (1,) * (k - 2)))
    i, j, l = 0, 3, 1
    assert s[(i, j, l)[: k - 1]] == pytest.approx(dense[(i, i, j, l)[:k]], rel=1e-12)
    W = jax.random.normal(jax.random.PRNGKey(9), (n, 4))
    sub = "abcd"[:k]
    new = np.einsum(
        f"{sub}," + ",".join(f"{c}{c.upper()}" for c in sub) + "->" + sub.upper(), dense, *[np.asarray(W)] * k
    )
    np.testing.assert_allclose(F.linear(W).dense(), new, rtol=1e-11, atol=1e-11)
    # Re-factoring non-top slices reproduces them and is zero where all indices differ.
    zero = lambda x: np.asarray(zero_coincident(jnp.asarray(x)))  # noqa: E731
    pats = [p for p in dg.int_partitions(k) if p != (1,) * k]
    slices = {p: jnp.asarray(zero(np.asarray(F.slice(p)))) for p in pats}
    G = refactor(slices, k, n, jnp.float64)
    np.testing.assert_allclose(G.slice((1,) * k) * (np.asarray(zero_coincident(jnp.ones((n,) * k)))), 0.0, atol=1e-12)
    for p in pats:
        np.testing.assert_allclose(zero(G.slice(p)), slices[p], rtol=1e-11, atol=1e-12)


def test_contract_memo_reads_back_only_equal_contractions():
    n, R, r = 4, 3, lowrank._RANK
    u, v, B = _random_factored(4, n, R, jax.random.PRNGKey(3)).parts
    memo = {}
    a = contract([(u, (0, r)), (v, (1, r)), (B, (r, 0, 2))], (0, 1, 2), n, jnp.float64, memo)
    np.testing.assert_allclose(a, np.einsum("ir,jr,ril->ijl", u, v, B), rtol=1e-12)
    # the same contraction with other labels, factor order, output order and B's (symmetric) legs
    # swapped: read back, transposed
    b = contract([(B, (r + 3, 7, 5)), (v, (6, r + 3)), (u, (5, r + 3))], (6, 7, 5), n, jnp.float64, memo)
    assert len(memo) == 1
    np.testing.assert_allclose(b, np.einsum("ir,jr,ril->jli", u, v, B), rtol=1e-12)
    # u and v exchanged, or a diagonal of B: different contractions, computed
    c = contract([(u, (1, r)), (v, (0, r)), (B, (r, 0, 2))], (0, 1, 2), n, jnp.float64, memo)
    d = contract([(u, (1, r)), (v, (2, r)), (B, (r, 0, 0))], (0, 1, 2), n, jnp.float64, memo)
    assert len(memo) == 3
    np.testing.assert_allclose(c, np.einsum("jr,ir,ril->ijl", u, v, B), rtol=1e-12)
    np.testing.assert_allclose(d, np.einsum("jr,lr,rii->ijl", u, v, B), rtol=1e-12)


@pytest.mark.parametrize(
    "expr, kind",
    [
        ("ar,ar,rbc->abc", "one GEMM"),  # the (R, n, n) factor alone on one side: no temporary, not blocked
        ("ar,br,cr->cab", "blocked"),  # Khatri-Rao side (n^2, ranks)
        ("ar,br,rac->abc", "blocked"),  # a per-rank scaled (R, n, n) side
        ("ar,br,rbc->bac", "blocked"),
        ("x,br,xr,rde->bde", "one GEMM"),  # a vector first summed into the ranks (premerge)
        ("x,br,dr,rxe->bde", "blocked"),  # ... or into the (R, n, n) factor
        ("ar,br,rcd->abcd", "blocked"),
        ("ar,br,rab->ab", None),  # no split with disjoint sides: einsum
    ],
)
def test_rank_gemm_plan_equals_einsum(expr, kind):
    n, R, r = 5, 15, lowrank._RANK
    ins, out = expr.split("->")
    code = {c: i for i, c in enumerate(sorted(set(expr) - set(",->r")))} | {"r": r}
    labels = [tuple(code[c] for c in s) for s in ins.split(",")]
    kept = tuple(code[c] for c in out)
    rng = np.random.default_rng(0)
    arrays = [jnp.asarray(rng.normal(size=tuple(R if c == "r" else n for c in s))) for s in ins.split(",")]
    arrays = [(a + jnp.swapaxes(a, 1, 2)) / 2 if a.ndim == 3 else a for a in arrays]  # (R, n, n): symmetric
    plan = lowrank.rank_gemm_plan(labels, kept, r)
    assert (plan is None) == (kind is None)
    if plan is not None:
        assert plan.blocked == (kind == "blocked")
    # n = 3 < R: the blocked plans loop over rank blocks of 3
    for width in (3, n):
        got = lowrank._summed_over_rank_blocks(list(zip(arrays, labels)), kept, width)
        np.testing.assert_allclose(got, np.einsum(expr, *arrays), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- transformations


def _random_net(seed, n, L):
    spec = cj.MLPSpec(n, n, n, L, "relu", init=cj.Init(b_var=0.01))
    return spec, cj.init_params(jax.random.PRNGKey(seed), spec, dtype=jnp.float64)


def test_factored_vmap_over_networks_matches_loop_and_unfactored():
    n, L = 4, 3
    nets = [_random_net(s, n, L) for s in range(2)]
    spec = nets[0][0]
    batched = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *[p for _, p in nets])
    g = cj.Gaussian.standard(n, jnp.float64)
    fac, dense = PropagationConfig(k_max=3, factored=True), PropagationConfig(k_max=3)
    got = jax.jit(jax.vmap(lambda p: cj.estimate_mean(p, spec, g, fac)))(batched)
    ref = jax.jit(lambda p: cj.estimate_mean(p, spec, g, dense))
    for i, (_, p) in enumerate(nets):
        # Simple factored and unfactored are the same estimator.
        np.testing.assert_allclose(got[i], ref(p), rtol=1e-11, atol=1e-13)


# ----------------------------------------------------------------------------- rank and memory model


@pytest.mark.parametrize(
    "k,kind", [(3, "simple"), (4, "simple"), (3, "augment"), pytest.param(4, "augment", marks=pytest.mark.slow)]
)
def test_rank_model_matches_the_real_ranks(k, kind):
    n, L = 3, 5
    spec, params = _random_net(0, n, L)
    cfg = PropagationConfig(k_max=k, kind=kind, factored=True)
    out = jax.eval_shape(lambda p: cj.propagate(p, spec, cj.Gaussian.standard(n), cfg), params)
    assert [out[f"act{l}"][k].rank for l in range(L - 1)] == factored_ranks(n, L, cfg)


def test_memory_model_admits_width_256_k4_factored_and_refuses_what_does_not_fit(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 20 * 2**30)  # a 24 GB machine: ~20 GiB free
    fac = lambda kind: PropagationConfig(k_max=4, kind=kind, factored=True, output_degree=1)  # noqa: E731
    assert estimated_bytes(256, 5, fac("simple"), 4) < 0.8 * 20 * 2**30
    assert estimated_bytes(256, 5, fac("augment"), 4) < 0.8 * 20 * 2**30
    assert estimated_bytes(256, 5, fac("augment"), 8) == pytest.approx(2 * estimated_bytes(256, 5, fac("augment"), 4))
    assert estimated_bytes(256, 5, PropagationConfig(k_max=4), 4) > 20 * 2**30  # dense: ~100 GiB
    # Abstract shapes only: the guard refuses before any work.
    layers = [(jax.ShapeDtypeStruct((1024, 1024), jnp.float32), None)] * 5
    spec = cj.MLPSpec(1024, 1024, 1024, 5, "relu")
    with pytest.raises(MemoryError, match="factored propagation"):
        cj.estimate_mean(layers, spec, cj.Gaussian.standard(1024, jnp.float32), fac("simple"))


# ----------------------------------------------------------------------------- benchmark script


@pytest.mark.slow  # ~4 subprocesses of jax start-up and compilation (~50 s on 2 cores)
def test_bench_factored_smoke_runs_and_resumes(tmp_path, monkeypatch):
    import bench_factored

    root = os.path.join(os.path.dirname(__file__), "..")

    config = os.path.join(root, "configs", "bench_factored_smoke.json")
    res = bench_factored.main(["--config", config, "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_factored_smoke.json").read_text())
    assert len(saved["entries"]) == 4 and all("run_s" in e and e["output_finite"] for e in saved["entries"].values())
    assert (tmp_path / "bench_factored_smoke.png").exists()
    assert res["series"]["k3_simple_fac"]["widths"] == [4, 6]
    # A rerun finds every configuration on disk and measures nothing.
    monkeypatch.setattr(bench_factored, "_run_worker", lambda *a: pytest.fail("recomputed a stored configuration"))
    again = bench_factored.main(["--config", config, "--out", str(tmp_path)])
    assert again["entries"] == res["entries"]


def test_bench_factored_rejects_bad_config(tmp_path):
    import bench_factored

    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"widths": [8], "orders": [2], "kinds": ["simple"], "layers": 3, "dtype": "float32", "repeats": 1})
    )
    with pytest.raises(ValueError, match="orders"):
        bench_factored.main(["--config", str(bad), "--out", str(tmp_path)])


# ----------------------------------------------------------------------------- bounded rank (rank_layers)


@pytest.mark.parametrize("k,kind", [(3, "simple"), (4, "simple"), (3, "augment")])
def test_rank_layers_drops_only_old_all_distinct_terms(k, kind):
    """rank_layers = m keeps the rank blocks of the last m layers: the ranks follow the model, and
    one step of the bounded mode differs from the exact step on the same input only on
    all-distinct entries, by exactly the dropped inherited blocks scaled by E[phi'] on every leg."""
    from cumjax.linear import linear_step
    from cumjax.nonlinear_factored import FactoredStep

    with jax.enable_x64(True):
        n, L, m = 4, 5, 1
        spec, params = _random_net(1, n, L)
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params)
        g = cj.Gaussian.standard(n, jnp.float64)
        exact = PropagationConfig(k_max=k, kind=kind, factored=True)
        bounded = PropagationConfig(k_max=k, kind=kind, factored=True, rank_layers=m)
        assert factored_ranks(n, L, bounded)[-1] < factored_ranks(n, L, exact)[-1]
        out = cj.propagate(params, spec, g, bounded)
        tops = [out[f"act{l}"][k] for l in range(L - 1)]
        assert [t.rank for t in tops] == factored_ranks(n, L, bounded)
        assert all(len(t.blocks) <= m and sum(t.blocks) == t.rank for t in tops)
        # one step from the bounded tower of act1
        W = params["params"]["layer2"]["kernel"]
        pre = linear_step(out["act1"], W, None, "exact", list(out["act1"]))
        new_exact = FactoredStep(pre, "relu", exact).output()[k]
        new_bounded = FactoredStep(pre, "relu", bounded).output()[k]
        diff = np.asarray(new_exact.dense() - new_bounded.dense())
        idx = np.indices((n,) * k)
        distinct = np.all([idx[a] != idx[b] for a in range(k) for b in range(a + 1, k)], axis=0)
        np.testing.assert_allclose(diff[~distinct], 0.0, atol=1e-12)
        w = FactoredStep(pre, "relu", exact).wick(1, 1)
        dropped = pre[k].scale_legs(w).dense()  # m = 1: every inherited block is dropped
        np.testing.assert_allclose(diff[distinct], np.asarray(dropped)[distinct], rtol=1e-9, atol=1e-12)
        assert np.abs(diff[distinct]).max() > 1e-6  # not vacuous


def test_rank_layers_covering_every_layer_is_exact_and_scanned_equals_unrolled():
    with jax.enable_x64(True):
        n, L = 4, 6
        spec, params = _random_net(2, n, L)
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params)
        g = cj.Gaussian.standard(n, jnp.float64)
        for k in (3, 4):
            exact = PropagationConfig(k_max=k, factored=True)
            ref = cj.estimate_mean(params, spec, g, exact)
            full = PropagationConfig(k_max=k, factored=True, rank_layers=L - 1)
            np.testing.assert_array_equal(cj.estimate_mean(params, spec, g, full), ref)
            bounded = PropagationConfig(k_max=k, factored=True, rank_layers=1)  # layers 2.. scanned
            scanned = jax.jit(lambda p, c=bounded: cj.estimate_mean(p, spec, g, c))(params)
            unrolled = cj.estimate_mean(params, spec, g, bounded, unroll=True)
            np.testing.assert_allclose(scanned, unrolled, rtol=1e-12, atol=1e-14)
            assert np.abs(np.asarray(scanned) - np.asarray(ref)).max() > 0  # a truncation, not the exact path
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="rank_layers"):
            PropagationConfig(k_max=3, factored=True, rank_layers=bad)


def test_rank_sharding_over_four_host_devices_equals_one_device():
    """PropagationConfig.mesh splits the rank contractions over 4 CPU devices (1-D and 2-D
    meshes, exact and bounded rank, a gradient): same numbers as one device, and the compiled
    program really sums partial results over devices."""
    code = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import dataclasses
        import jax, jax.numpy as jnp, numpy as np
        jax.config.update("jax_enable_x64", True)
        import cumjax as cj
        devices = np.array(jax.devices())
        assert devices.size == 4
        line, square = jax.sharding.Mesh(devices, ("r",)), jax.sharding.Mesh(devices.reshape(2, 2), ("a", "b"))
        spec = cj.MLPSpec(6, 8, 3, 4, ("relu", "tanh", "relu"))
        p = cj.init_params(jax.random.PRNGKey(0), spec)
        g = cj.Gaussian(jnp.full(6, 0.1), jnp.eye(6) * 0.9 + 0.1)
        run = jax.jit(cj.propagate, static_argnums=(1, 3))
        # (k4 augment shares the machinery; its sharded program takes minutes to compile)
        cases = [(3, "simple", None, line), (3, "augment", 2, square), (4, "simple", 2, line)]
        for k, kind, rank_layers, mesh in cases:
            one = cj.PropagationConfig(k, kind, factored=True, rank_layers=rank_layers)
            want = run(p, spec, g, one)
            got = cj.propagate(p, spec, g, dataclasses.replace(one, mesh=mesh))
            jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13), got, want)
        one = cj.PropagationConfig(3, "simple", factored=True)
        four = dataclasses.replace(one, mesh=line)
        loss = lambda p, c: jnp.sum(cj.estimate_mean(p, spec, g, c) ** 2)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13),
                               jax.grad(loss)(p, four), jax.grad(loss)(p, one))
        hlo = jax.jit(cj.estimate_mean, static_argnums=(1, 3)).lower(p, spec, g, four).compile().as_text()
        assert "all-reduce" in hlo
        for bad, match in [(dataclasses.replace(spec, width=6), "divide the width"), (None, "factored=True")]:
            try:
                if bad is None:
                    cj.PropagationConfig(2, mesh=line)
                else:
                    cj.propagate(cj.init_params(jax.random.PRNGKey(0), bad), bad, g, four)
            except ValueError as e:
                assert match in str(e), e
            else:
                raise AssertionError(match)
        print("OK")
    """)
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), ".."))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("k", [3, 4])
def test_linear_writes_W_into_identity_chunks(k):
    """The e_i legs of fresh rank blocks (re-factored slices, leaf groups) are identity chunks: the
    linear map writes W^T there (the same tensor as multiplying) and saves 2 n n_out n FLOPs each;
    concat and split keep the chunks' offsets."""
    n, m = 6, 5
    rng = np.random.default_rng(3)
    sym = lambda a: a + np.swapaxes(a, 1, 2)  # noqa: E731
    old_parts = [rng.normal(size=(n, n)), rng.normal(size=(n, n))]
    old_parts.append(rng.normal(size=(n, n)) if k == 3 else sym(rng.normal(size=(n, n, n))))  # rank-major
    old = FactoredTensor([jnp.asarray(p) for p in old_parts], lowrank.legs_for(k), n)
    slices = {b: jnp.asarray(rng.normal(size=(n,) * len(b))) for b in dg.int_partitions(k) if len(b) < k}
    slices = {b: zero_coincident(a) if len(b) > 1 else a for b, a in slices.items()}
    leaves = lowrank.from_leaf_groups(
        [(jnp.asarray(rng.normal(size=(n, n))), jnp.asarray(rng.normal(size=(n,) * (k - 1))))], k, n
    )
    t = old.concat(refactor(slices, k, n, jnp.float64)).concat(leaves)
    assert t.diag == ((0, n), (1, n), (1, 2 * n))
    plain = FactoredTensor(t.parts, t.legs, n, t.blocks)
    W = jnp.asarray(rng.normal(size=(n, m)))
    got, want = t.linear(W), plain.linear(W)
    for a, b in zip(got.parts, want.parts):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)
    assert got.diag == ()
    flops = lambda f: cj.jaxpr_flops(lambda w: f.linear(w).parts, W).matmul  # noqa: E731
    saved = flops(plain) - flops(t)
    assert saved == 3 * 2 * n * m * n
    first, rest = t.split_blocks(1)
    assert first.diag == () and rest.diag == ((0, 0), (1, 0), (1, n))


def test_tied_parts_and_diagonal_chunks_are_the_same_tensor():
    """A part used twice (powers) and diagonal rank chunks: slices, linear map, leg scaling,
    concatenation with an untied tensor and the diagonal-only slice path equal the explicit
    tensor with the parts written out."""
    n, m = 5, 4
    rng = np.random.default_rng(7)
    E, s, A, C = (jnp.asarray(rng.normal(size=sh)) for sh in [(n, n), (n,), (n, 2 * n), (n, 2 * n)])
    leaves = lowrank.from_leaf_groups([(E, s)], 3, n, tied=True)
    assert leaves.powers == (2, 1) and leaves.diag == ((1, 0),) and leaves._diagonal_part() == 1
    # the same tensor with three independent parts: E (x) (s e) (x) E
    plain = FactoredTensor([E, jnp.diag(s), E], (1, 1, 1), n)
    tied = FactoredTensor([A, C], (1, 1), n, powers=(2, 1))
    want_tied = FactoredTensor([A, A, C], (1, 1, 1), n)
    for got, want in [(leaves, plain), (tied, want_tied)]:
        np.testing.assert_allclose(got.dense(), _explicit(want), rtol=1e-12, atol=1e-12)
        for pat in [(2, 1), (3,)]:
            np.testing.assert_allclose(got.slice(pat), want.slice(pat), rtol=1e-12, atol=1e-12)
    W, v = jnp.asarray(rng.normal(size=(n, m))), jnp.asarray(rng.normal(size=n))
    np.testing.assert_allclose(leaves.linear(W).dense(), plain.linear(W).dense(), rtol=1e-11, atol=1e-12)
    scaled = tied.scale_legs(v, 0.7)
    np.testing.assert_allclose(scaled.dense(), want_tied.scale_legs(v, 0.7).dense(), rtol=1e-12, atol=1e-12)
    both = tied.concat(leaves)
    assert both.powers == (2, 1) and both.diag == ((1, 2 * n),)
    mixed = plain.concat(tied)  # untied with tied: written out
    assert mixed.powers == (1, 1, 1)
    np.testing.assert_allclose(mixed.dense(), _explicit(plain) + _explicit(want_tied), rtol=1e-12, atol=1e-12)
    # re-factored k = 3 slices are tied too (e_r e_r c_r)
    assert refactor({(2, 1): zero_coincident(A[:, :n]), (3,): s}, 3, n, jnp.float64).powers == (2, 1)


@pytest.mark.parametrize("kind,powers", [("simple", (2, 1)), ("augment", (1, 1, 1))])
def test_k3_simple_top_is_stored_with_tied_legs(kind, powers):
    """Every term of k3 simple's new top has two equal legs, found from the diagrams' factors;
    augment's do not. The tied propagation equals the unfactored one (simple: same estimator)."""
    n, L = 4, 4
    spec, params = _random_net(3, n, L)
    g = cj.Gaussian.standard(n, jnp.float64)
    out = cj.propagate(params, spec, g, PropagationConfig(k_max=3, kind=kind, factored=True))
    assert all(out[f"act{l}"][3].powers == powers for l in range(L - 1))
    if kind == "simple":
        dense = cj.propagate(params, spec, g, PropagationConfig(k_max=3))
        np.testing.assert_allclose(out.mean(), dense.mean(), rtol=1e-11, atol=1e-13)
