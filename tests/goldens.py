"""The reference implementation's goldens (tests/data/goldens, copied from ../shared/goldens) and
how to run them: every test that reads them goes through here, so missing data fails loudly."""

import glob
import json
import os

import jax.numpy as jnp
import numpy as np

import cumjax as cj

DATA = os.path.join(os.path.dirname(__file__), "data", "goldens")
# Counted from the data set as shipped (cases/manifest.json lists 57 cases; kprop/ holds 75).
EXPECTED = {"cases": 57, "kprop": 75}


def golden_files(folder: str | None = None) -> list[str]:
    """Sorted golden paths (of one folder, or both); raises if the data set is missing or short."""
    folders = [folder] if folder else list(EXPECTED)
    paths = []
    for f in folders:
        found = sorted(glob.glob(os.path.join(DATA, f, "*.npz")))
        if len(found) < EXPECTED[f]:
            raise FileNotFoundError(
                f"test data missing: expected {EXPECTED[f]} golden .npz files in {os.path.join(DATA, f)}, found "
                f"{len(found)}; they ship with the repository (git checkout tests/data/goldens)"
            )
        paths += found
    return paths


def ids(paths):
    return [os.path.basename(os.path.dirname(p)) + "/" + os.path.basename(p)[:-4] for p in paths]


def config_of(meta) -> cj.PropagationConfig:
    return cj.PropagationConfig(
        k_max=meta["k_max"],
        kind=meta["kind"].lower(),
        avg_metric=meta["use_avg_metric"],
        factored=meta["factor"],
        output_degree=meta.get("output_d_max", 3),
    )


def load(path, dtype=jnp.float64):
    """``(spec, params, gaussian, config, meta, arrays)`` of one golden, arrays in ``dtype``."""
    spec, params, meta, arrays = cj.load_golden(path, dtype)
    gaussian = cj.Gaussian(jnp.asarray(arrays["Kin_1"], dtype), jnp.asarray(arrays["Kin_2"], dtype))
    return spec, params, gaussian, config_of(meta), meta, arrays


def golden_arrays(arrays):
    """``(key, label, degree, array)`` for every stored layer cumulant."""
    for key, value in arrays.items():
        if "_K" in key and not key.startswith("Kin"):
            label, d = key.split("_K")
            yield key, label, int(d), value


def meta_of(path) -> dict:
    with np.load(path) as z:
        return json.loads(str(z["meta"]))
