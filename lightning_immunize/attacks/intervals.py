"""Bootstrap intervals of a card's ratios, over the attacker's re-runs (seed and data subset)
and the scoring samples, paired across models (every model faced the same re-runs and is
scored on the same samples)."""

from __future__ import annotations

import math

import numpy as np

#: Bootstrap replicates and the interval's coverage.
REPLICATES = 2000
LEVEL = 0.90


def mean_over_marks(per_sample: list[list[list[float]]]) -> np.ndarray:
    """``(R, N)``: each re-run's per-sample metric averaged over the step marks, from
    ``per_sample`` ``[run][mark][sample]``."""
    return np.asarray(per_sample, dtype=np.float64).mean(axis=1)


def bootstrap_means(
    values: dict[str, np.ndarray], replicates: int = REPLICATES, seed: int = 0
) -> dict[str, np.ndarray]:
    """Per model, ``replicates`` bootstrap means of ``values[model]`` ``(R, N)``: re-runs and
    samples resampled with replacement, the same draws for every model.

    Example:
        >>> v = {"a": np.ones((3, 5)), "b": np.zeros((3, 5))}
        >>> out = bootstrap_means(v, replicates=4)
        >>> out["a"].tolist(), out["b"].tolist()
        ([1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0])
    """
    shapes = {v.shape for v in values.values()}
    if len(shapes) != 1:
        raise ValueError(
            f"models were re-run or scored differently, got shapes {sorted(shapes)}; expected "
            "one (runs, samples) shape for every model."
        )
    runs, samples = shapes.pop()
    rng = np.random.default_rng(seed)
    run_counts = rng.multinomial(runs, np.full(runs, 1.0 / runs), size=replicates)
    sample_counts = rng.multinomial(samples, np.full(samples, 1.0 / samples), size=replicates)
    scale = 1.0 / (runs * samples)
    return {
        model: np.einsum("br,ri,bi->b", run_counts, v, sample_counts) * scale
        for model, v in values.items()
    }


def ratio_interval(
    top_a: np.ndarray, top_b: np.ndarray, base_a: np.ndarray, base_b: np.ndarray,
    level: float = LEVEL,
) -> tuple[float, float] | None:  # fmt: skip
    """The percentile interval of ``(top_a − top_b) / (base_a − base_b)`` over bootstrap
    replicates whose denominator is not 0; ``None`` when fewer than half have one."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (top_a - top_b) / (base_a - base_b)
    ratio = ratio[np.isfinite(ratio)]
    if ratio.size < 0.5 * top_a.size:
        return None
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(ratio, [tail, 100 - tail])
    return float(low), float(high)


def contains_zero(interval: tuple[float, float] | None) -> bool:
    """Whether an interval contains 0 (a claim of no measurable effect)."""
    return interval is not None and interval[0] <= 0.0 <= interval[1]


def fmt_interval(interval: tuple[float, float] | None, digits: int = 2) -> str:
    if interval is None or not all(math.isfinite(v) for v in interval):
        return "—"
    low, high = (round(v, digits) + 0.0 for v in interval)  # no "-0.00"
    return f"[{low:.{digits}f}, {high:.{digits}f}]"
