"""The estimator's result: the tracked cumulants of every layer, as one typed pytree."""

from __future__ import annotations

from collections.abc import Mapping

import jax

from .lowrank import FactoredTensor
from .radial import RadialTensor

Array = jax.Array
Tensor = RadialTensor | FactoredTensor


@jax.tree_util.register_pytree_node_class
class Cumulants(Mapping):
    """Cumulants of every layer of a network: ``self[label][d]`` is the degree-``d`` cumulant of
    layer ``label`` (a :class:`RadialTensor`, or a :class:`FactoredTensor` for the factored top
    degree). Labels (``pre0, act0, ..., pre{L-1}``, see :mod:`cumjax.mlp`) and the degrees of each
    layer are static metadata; the arrays are the leaves, so the result passes through ``jit``,
    ``vmap`` (then every array gains the batch axis) and ``grad``.
    """

    def __init__(self, layers: Mapping[str, Mapping[int, Tensor]]):
        self._layers = {label: dict(sorted(tower.items())) for label, tower in layers.items()}

    def tree_flatten(self):
        keys = tuple((label, tuple(tower)) for label, tower in self._layers.items())
        return tuple(t for tower in self._layers.values() for t in tower.values()), keys

    @classmethod
    def tree_unflatten(cls, keys, leaves):
        it = iter(leaves)
        return cls({label: {d: next(it) for d in degrees} for label, degrees in keys})

    # Mapping: label -> {degree: tensor}
    def __getitem__(self, label: str) -> dict[int, Tensor]:
        try:
            return self._layers[label]
        except KeyError:
            raise KeyError(f"no layer {label!r}; layers: {', '.join(self._layers)}") from None

    def __iter__(self):
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self):
        body = ", ".join(f"{label}: {tuple(tower)}" for label, tower in self._layers.items())
        return f"Cumulants({body})"

    @property
    def labels(self) -> tuple[str, ...]:
        """Layer labels in network order."""
        return tuple(self._layers)

    @property
    def output_label(self) -> str:
        """The network output's label, ``pre{L-1}``."""
        return self.labels[-1]

    def degrees(self, label: str | None = None) -> tuple[int, ...]:
        """Degrees tracked at ``label`` (default: the output)."""
        return tuple(self[label or self.output_label])

    def tensor(self, label: str | None, d: int) -> Tensor:
        """The degree-``d`` cumulant of ``label`` (default: the output) in its stored form."""
        tower = self[label or self.output_label]
        if d not in tower:
            raise KeyError(f"degree {d} is not tracked at {label or self.output_label}; tracked: {tuple(tower)}")
        return tower[d]

    def mean(self, label: str | None = None) -> Array:
        """Estimated mean ``(n,)`` of layer ``label`` (default: the network output)."""
        return self.tensor(label, 1).core

    def cov(self, label: str | None = None) -> Array:
        """Estimated covariance ``(n, n)`` of layer ``label`` (at k_max = 1 only its trace part is
        tracked, so it is ``c * diag`` of the metric)."""
        return self.tensor(label, 2).dense()

    def dense(self, label: str | None, d: int) -> Array:
        """The degree-``d`` cumulant of ``label`` as a dense ``(n,)*d`` array (O(n^d) memory)."""
        return self.tensor(label, d).dense()
