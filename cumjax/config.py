"""Configuration of one cumulant-propagation estimator."""

from __future__ import annotations

import dataclasses

import jax

from . import diagrams as dg


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class PropagationConfig:
    """Static configuration of one estimator (hashable: usable as a static jit argument).

    k_max: accuracy budget (the paper's K), 1..4; squared error ~ width^-k_max.
    kind: term set, ``"simple"`` or ``"augment"``.
    avg_metric: after hidden linear layers use E[W^T W] = w_var I instead of W^T W for the
        radial pieces (w_var from the network's initialisation, ``MLPSpec.init``; only matters
        where a degree is kept in radial form).
    factored: keep the top cumulant (k_max 3 or 4) in low-rank form (:class:`FactoredTensor`,
        rank growing ~width per layer) with the factored term set (equal to unfactored for
        ``simple``; for ``augment`` it drops the diagrams that admit no low-rank evaluation): cost
        and memory drop by a factor of width. Ignored for k_max <= 2.
    output_degree: highest degree passed through the output layer (None: all tracked).
    rank_layers: factored only: keep in the low-rank top cumulant just the rank blocks created by
        the last ``rank_layers`` hidden layers, dropping the all-distinct part of older ones (each
        nonlinearity damps them by about (E[phi'(Z)] sqrt(w_var))^k). The rank then stops growing
        after ``rank_layers`` layers and so does the cost per layer; an approximation whose error
        the README measures (m <= 3 is not within 10% of exact at depth 8). None (default): keep
        everything (exact; the goldens).
    mesh: factored only: a ``jax.sharding.Mesh`` whose devices (all its axes) split the rank
        axis of the low-rank top cumulant: the contractions summing over ranks run on each
        device's share and are summed over devices, the per-rank linear maps run in place; the
        dense slices are computed on every device. The width must be a multiple of the mesh size.
        None (default): one device.
    """

    k_max: int = 2
    kind: str = "simple"
    avg_metric: bool = False
    factored: bool = False
    output_degree: int | None = None
    rank_layers: int | None = None
    mesh: jax.sharding.Mesh | None = None

    def __post_init__(self):
        if not _is_int(self.k_max) or self.k_max not in (1, 2, 3, 4):
            raise ValueError(f"k_max must be the int 1, 2, 3 or 4, got {self.k_max!r}")
        if not isinstance(self.kind, str):
            raise ValueError(f"kind must be 'simple' or 'augment', got {self.kind!r}")
        dg.check_kind(self.kind)
        for name in ("avg_metric", "factored"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.output_degree is not None and (not _is_int(self.output_degree) or self.output_degree < 1):
            raise ValueError(f"output_degree must be an int >= 1 or None, got {self.output_degree!r}")
        if self.rank_layers is not None and (not _is_int(self.rank_layers) or self.rank_layers < 1):
            raise ValueError(f"rank_layers must be an int >= 1 or None, got {self.rank_layers!r}")
        if self.mesh is not None:
            if not isinstance(self.mesh, jax.sharding.Mesh):
                raise ValueError(f"mesh must be a jax.sharding.Mesh or None, got {self.mesh!r}")
            if not self.is_factored:
                raise ValueError("mesh splits the factored top cumulant's rank: needs factored=True and k_max 3 or 4")

    @property
    def is_factored(self) -> bool:
        """Whether the top cumulant is kept in low-rank form (``factored`` and k_max 3 or 4)."""
        return self.factored and self.k_max >= 3

    @property
    def name(self) -> str:
        fac = "_fac" if self.is_factored else ""
        if self.is_factored and self.rank_layers is not None:
            fac += f"{self.rank_layers}"
        avg = "_avg" if self.avg_metric else ""
        return f"k{self.k_max}_{self.kind}{fac}{avg}"


def check_config(config) -> PropagationConfig:
    """``config`` if it is a :class:`PropagationConfig`, else TypeError."""
    if not isinstance(config, PropagationConfig):
        raise TypeError(f"config must be a cumjax.PropagationConfig, got {type(config).__name__} ({config!r})")
    return config
