"""The README's Python code blocks run as written (so they cannot drift from the API)."""

import os
import re

import jax

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_python_blocks_run():
    with open(README) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert blocks, "no python blocks in README.md"
    namespace = {}
    with jax.enable_x64(False):  # as a user's fresh session: float32
        for block in blocks:
            exec(compile(block, README, "exec"), namespace)  # noqa: S102
    est, truth = namespace["est"], namespace["truth"]
    assert est.shape == (128,) and est.dtype == jax.numpy.float32
    assert namespace["score"]["mse"] > 0 and namespace["per_input"].shape == (2, 128)
    assert abs(float(est.mean() - truth.mean["pre4"].mean())) < 0.05
