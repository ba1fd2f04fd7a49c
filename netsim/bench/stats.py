"""Statistics for benchmark repetitions: medians, percentiles and bootstrap intervals.

Samples come in repetitions. Within a repetition, connect latencies are summarised by
their percentiles; across repetitions the reported value is the median of the
per-repetition values and its confidence interval is a percentile bootstrap of that
median (repetitions resampled with replacement). On a shared, noisy machine most of the
uncertainty is between repetitions, so resampling whole repetitions is the honest choice:
resampling single connections would pretend they are independent draws.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

PERCENTILES = (50, 90, 99)
BOOTSTRAP = 2000            # resamples
CONFIDENCE = 0.95
SEED = 20240601             # fixed: the same samples always give the same interval


def percentiles(values: Sequence[float], qs: Sequence[float] = PERCENTILES) -> dict[str, float]:
    """``{"p50": …, "p90": …, "p99": …}`` of one repetition's values (linear interpolation)."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        raise ValueError("no samples")
    return {f"p{q:g}": float(v) for q, v in zip(qs, np.percentile(a, qs))}


def bootstrap_ci(values: Sequence[float], statistic=np.median, resamples: int = BOOTSTRAP,
                 confidence: float = CONFIDENCE, seed: int = SEED) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``statistic`` over ``values`` (one value per
    repetition). One value gives a zero-width interval: nothing to resample."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        raise ValueError("no samples")
    if a.size == 1:
        return float(a[0]), float(a[0])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(resamples, a.size))
    stats = statistic(a[idx], axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def summarize(values: Sequence[float]) -> dict:
    """Median, bootstrap interval of the median, min, max, mean and count of per-repetition values."""
    a = np.asarray(values, dtype=float)
    low, high = bootstrap_ci(a)
    return {"n": int(a.size), "median": float(np.median(a)), "ci_low": low, "ci_high": high,
            "min": float(a.min()), "max": float(a.max()), "mean": float(a.mean())}


def ratio(values: Sequence[float], baseline: Sequence[float], resamples: int = BOOTSTRAP,
          confidence: float = CONFIDENCE, seed: int = SEED) -> dict:
    """Ratio of medians ``values / baseline`` with a bootstrap interval (both sides resampled
    independently: they come from different repetitions)."""
    a, b = np.asarray(values, dtype=float), np.asarray(baseline, dtype=float)
    if a.size == 0 or b.size == 0:
        raise ValueError("no samples")
    value = float(np.median(a) / np.median(b))
    rng = np.random.default_rng(seed)
    ma = np.median(a[rng.integers(0, a.size, size=(resamples, a.size))], axis=1)
    mb = np.median(b[rng.integers(0, b.size, size=(resamples, b.size))], axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(ma / mb, [tail, 100 - tail])
    return {"ratio": value, "ci_low": float(low), "ci_high": float(high)}


def connect_repetition(latencies_ns: Sequence[int], seconds: float, errors: int = 0) -> dict:
    """One connect loop's summary: percentiles in µs and the rate of completed connections."""
    a = np.asarray(latencies_ns, dtype=float) / 1000.0
    out = {f"{k}_us": v for k, v in percentiles(a).items()}
    out.update(count=int(a.size), errors=int(errors), seconds=float(seconds),
               rate_per_s=float(a.size / seconds) if seconds > 0 else 0.0, mean_us=float(a.mean()))
    return out
