"""Memory model of propagation: peak bytes from the shapes, checked before any work."""

from __future__ import annotations

import os

from .config import PropagationConfig

# Rank added per hidden layer, in units of the width, by the factored top cumulant (counted from
# the construction; the first hidden layer starts at 2n): leaf groups of the hypertree diagrams plus n for the
# re-factored non-top slices. tests/test_factored.py checks these against the real ranks.
_FACTORED_RANK_GROWTH = {(3, "simple"): 2, (4, "simple"): 2, (3, "augment"): 7, (4, "augment"): 10}


def factored_ranks(width: int, num_layers: int, config: PropagationConfig) -> list[int]:
    """Rank of the factored top cumulant after each hidden layer (an upper bound with avg_metric):
    the sum of the rank blocks each layer adds (2n, then g n), or of the last ``rank_layers``."""
    g = _FACTORED_RANK_GROWTH[(config.k_max, config.kind)]
    added = [width * (2 if l == 0 else g) for l in range(num_layers - 1)]
    m = config.rank_layers or num_layers
    return [sum(added[max(0, l + 1 - m) : l + 1]) for l in range(num_layers - 1)]


def estimated_bytes(width: int, num_layers: int, config: PropagationConfig, itemsize: int = 4) -> int:
    """Rough peak memory of propagation.

    Unfactored: the dense order-k cores of every stored layer plus the working slices of one
    nonlinear step. Factored (k_max 3/4): a few copies (calibrated per k and term set on XLA's
    buffer assignment) of the factors of the two largest live layers plus dense working arrays of
    order k-1; when every degree is returned (``output_degree`` None or
    >= k) also every layer's stored factors. Modelled on a jitted call (``estimate_mean`` under
    ``jax.jit``); eager calls keep more intermediates alive.
    """
    n, k = width, config.k_max
    if not (config.factored and k >= 3):
        top = n**k
        working = 12 if config.kind == "augment" else 6
        return int((2 * num_layers + working) * top * itemsize)
    ranks = factored_ranks(n, num_layers, config) or [0]
    part = 3 * n if k == 3 else n * n + 2 * n  # floats per unit of rank
    everything = config.output_degree is None or config.output_degree >= k
    # Below the top degree at the output, the last hidden layer's top cumulant is dead code under
    # jit, so the two layers before it are the largest live ones.
    live_ranks = ranks[-2:] if everything or len(ranks) < 2 else ranks[-3:-1]
    # Per (k, term set): live copies of those factors (contractions are summed over blocks of n
    # ranks, so their temporaries are small) and order k-1 working slices (k4 augment: the n^3
    # slices of the step, not the factors, are most of the peak until the rank passes ~50n; k4
    # simple: few slices, mostly the factors); calibrated on XLA's buffer assignment (README,
    # "Memory"; experiments/bench_memory.py).
    copies, slices = {
        (3, "simple"): (3, 12),
        (3, "augment"): (6, 24),
        (4, "simple"): (0.95, 5),
        (4, "augment"): (0.95, 62),
    }[(k, config.kind)]
    live = copies * part * sum(live_ranks)
    # the bounded mode also caches the dropped blocks' slices
    dense = (slices + (12 if config.rank_layers else 0)) * n ** (k - 1)
    stored = 2 * part * sum(ranks) if everything else 0
    return int((live + dense + stored + num_layers * n * n) * itemsize)


def available_bytes() -> int:
    """Memory a new allocation can get: Linux's MemAvailable (free pages plus reclaimable page
    cache; free pages alone undercount after file I/O), else the free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 34


def check_memory(width: int, num_layers: int, config: PropagationConfig, itemsize: int) -> None:
    """Raise MemoryError, naming a cheaper variant, if :func:`estimated_bytes` exceeds 80% of the
    memory available now."""
    need, have = estimated_bytes(width, num_layers, config, itemsize), available_bytes()
    if need <= 0.8 * have:
        return
    if config.is_factored:
        raise MemoryError(
            f"factored propagation at width {width}, k_max={config.k_max}, {num_layers} layers needs about "
            f"{need / 2**30:.1f} GiB (rank-R factors, R growing ~width per layer), more than 80% of the "
            f"{have / 2**30:.1f} GiB this machine has free now; use a smaller width, depth or k_max, or "
            f"output_degree=1"
        )
    raise MemoryError(
        f"unfactored propagation at width {width}, k_max={config.k_max} needs about {need / 2**30:.1f} GiB "
        f"(dense order-{config.k_max} cumulants, O(width^{config.k_max})), more than 80% of the "
        f"{have / 2**30:.1f} GiB this machine has free now; use a smaller width or k_max, or the low-rank "
        f"factored k=3/4 variant (factored=True) that removes a factor of width"
    )
