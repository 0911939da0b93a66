"""Bad input gets a clear error naming the argument, before any heavy work."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cumjax as cj
from cumjax import memory, tails

SPEC = cj.MLPSpec(4, 5, 3, 3, "relu")
PARAMS = cj.init_params(jax.random.PRNGKey(0), SPEC, dtype=jnp.float64)
G = cj.Gaussian.standard(4, jnp.float64)
CFG = cj.PropagationConfig(k_max=2)


def _kernel(l, new):
    """PARAMS with layer ``l``'s kernel replaced."""
    p = jax.tree_util.tree_map(lambda x: x, PARAMS)
    p["params"][f"layer{l}"]["kernel"] = new
    return p


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k_max=5), "k_max"),
        (dict(k_max=True), "k_max"),
        (dict(k_max=2.0), "k_max"),
        (dict(k_max="2"), "k_max"),
        (dict(kind="full"), "term set"),
        (dict(kind=None), "kind"),
        (dict(factored="yes"), "factored"),
        (dict(avg_metric=1), "avg_metric"),
        (dict(output_degree=0), "output_degree"),
        (dict(output_degree=1.0), "output_degree"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cj.PropagationConfig(**kwargs)


@pytest.mark.parametrize("config", [2, "k2", None, {"k_max": 2}])
def test_config_of_the_wrong_type(config):
    with pytest.raises(TypeError, match="config must be a cumjax.PropagationConfig"):
        cj.estimate_mean(PARAMS, SPEC, G, config)


BAD_INPUTS = [
    ("3-D kernel", lambda: (_kernel(0, jnp.ones((4, 5, 1))), SPEC, G), "layer0 kernel has shape"),
    (
        "middle kernel",
        lambda: (_kernel(1, jnp.ones((5, 6))), SPEC, G),
        "layer1 kernel has shape \\(5, 6\\), expected \\(5, 5\\)",
    ),
    ("float16 kernel", lambda: (_kernel(2, jnp.ones((5, 3), jnp.float16)), SPEC, G), "layer2 kernel has dtype float16"),
    (
        "bfloat16 kernel",
        lambda: (_kernel(2, jnp.ones((5, 3), jnp.bfloat16)), SPEC, G),
        "layer2 kernel has dtype bfloat16",
    ),
    ("int kernel", lambda: (_kernel(0, jnp.ones((4, 5), jnp.int32)), SPEC, G), "layer0 kernel has dtype int32"),
    ("NaN kernel", lambda: (_kernel(1, jnp.full((5, 5), jnp.nan)), SPEC, G), "layer1 kernel contains NaN"),
    ("layers", lambda: (PARAMS, cj.MLPSpec(4, 5, 3, 2, "relu"), G), "3 linear layers, spec says 2"),
    (
        "float16 mean",
        lambda: (PARAMS, SPEC, cj.Gaussian(jnp.zeros(4, jnp.float16), jnp.eye(4))),
        "input mean has dtype float16",
    ),
    (
        "bfloat16 cov",
        lambda: (PARAMS, SPEC, cj.Gaussian(jnp.zeros(4), jnp.eye(4, dtype=jnp.bfloat16))),
        "input cov has dtype",
    ),
    (
        "mean shape",
        lambda: (PARAMS, SPEC, cj.Gaussian(jnp.zeros(3), jnp.eye(4))),
        "input mean must have shape \\(4,\\)",
    ),
    ("cov shape", lambda: (PARAMS, SPEC, cj.Gaussian(jnp.zeros(4), jnp.eye(3))), "input cov must have shape"),
    (
        "NaN mean",
        lambda: (PARAMS, SPEC, cj.Gaussian(jnp.zeros(4).at[1].set(jnp.nan), jnp.eye(4))),
        "input mean contains NaN",
    ),
    (
        "non-PSD",
        lambda: (PARAMS, SPEC, cj.Gaussian(jnp.zeros(4), jnp.eye(4).at[0, 0].set(-1.0))),
        "positive semi-definite",
    ),
    ("asymmetric", lambda: (PARAMS, SPEC, cj.Gaussian(jnp.zeros(4), jnp.eye(4).at[0, 1].set(0.5))), "not symmetric"),
    ("params type", lambda: ("weights", SPEC, G), "params must be Flax variables"),
    ("layer names", lambda: ({"params": {"dense": {"kernel": jnp.ones((4, 5))}}}, SPEC, G), "layer0"),
]


@pytest.mark.parametrize("make,match", [(m, r) for _, m, r in BAD_INPUTS], ids=[i for i, _, _ in BAD_INPUTS])
def test_bad_input_to_the_estimator_and_the_sampler(make, match):
    params, spec, g = make()
    with pytest.raises(ValueError, match=match):
        cj.estimate_mean(params, spec, g, CFG)
    with pytest.raises(ValueError, match=match):
        cj.monte_carlo(jax.random.PRNGKey(0), params, spec, g, 100)


def test_checks_under_jit_see_shapes_always_and_values_when_concrete():
    # a traced mean: its values are unknown at trace time, its shape is checked
    with pytest.raises(ValueError, match="input mean must have shape"):
        jax.jit(lambda m: cj.estimate_mean(PARAMS, SPEC, cj.Gaussian(m, G.cov), CFG))(jnp.zeros(3))
    # closed-over params are concrete under jit: their values are checked
    bad = _kernel(0, jnp.full((4, 5), jnp.inf))
    with pytest.raises(ValueError, match="layer0 kernel contains NaN or Inf"):
        jax.jit(lambda m: cj.estimate_mean(bad, SPEC, cj.Gaussian(m, G.cov), CFG))(G.mean)


def test_spec_and_init_errors():
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        cj.MLPSpec(4, 4, 4, 2, "swish")
    with pytest.raises(ValueError, match="2 activations"):
        cj.MLPSpec(4, 4, 4, 3, ("relu",))
    with pytest.raises(ValueError, match="dimensions must be ints"):
        cj.MLPSpec(4, 4.0, 4, 2, "relu")
    with pytest.raises(ValueError, match="Init.w_var"):
        cj.Init(kind="manual", w_var=float("nan"))
    with pytest.raises(ValueError, match="Init.w_var"):
        cj.Init(kind="manual", w_var=(1.0, -2.0))
    with pytest.raises(ValueError, match="Init.b_mean"):
        cj.Init(b_mean=float("inf"))
    with pytest.raises(ValueError, match="MLPSpec.init"):
        cj.MLPSpec(4, 4, 4, 2, "relu", init="he")


def test_deprecated_form_checks_weight_variances():
    layers = cj.layer_weights(PARAMS)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="w_var"):
        cj.estimate_mean(
            layers, ["relu", "relu"], G.mean, G.cov, cj.PropagationConfig(avg_metric=True), [1.0, np.nan, 2.0]
        )
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="w_var"):
        cj.estimate_mean(layers, ["relu", "relu"], G.mean, G.cov, CFG, [1.0, -2.0, 2.0])
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="avg_metric=True needs weight_variances"):
        cj.estimate_mean(layers, ["relu", "relu"], G.mean, G.cov, cj.PropagationConfig(avg_metric=True))


def test_configuration_too_large_for_memory_is_refused_before_work():
    # 256^4 dense cumulants per layer: hundreds of GiB. Abstract shapes only: nothing is allocated.
    n = 256
    spec = cj.MLPSpec(n, n, n, 5, "relu")
    layers = [(jax.ShapeDtypeStruct((n, n), jnp.float32), None)] * 5
    with pytest.raises(MemoryError, match="factored k=3/4"):
        cj.estimate_mean(layers, spec, cj.Gaussian.standard(n, jnp.float32), cj.PropagationConfig(k_max=4))
    assert memory.estimated_bytes(n, 5, cj.PropagationConfig(k_max=4), 4) > 100 * 2**30


def test_tail_probability_errors():
    with pytest.raises(ValueError, match="layer must be an int"):
        tails.tail_probabilities(PARAMS, SPEC, G, 5, jnp.array([1.0]), CFG)
    with pytest.raises(ValueError, match="thresholds must have shape"):
        tails.tail_probabilities(PARAMS, SPEC, G, 1, jnp.ones((1, 1, 1)), CFG)
    with pytest.raises(ValueError, match="neurons"):
        tails.tail_probabilities(PARAMS, SPEC, G, 1, jnp.array([1.0]), CFG, neurons=[7])
    with pytest.raises(TypeError, match="config"):
        tails.tail_probabilities(PARAMS, SPEC, G, 1, jnp.array([1.0]), 2)
