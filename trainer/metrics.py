"""The field's continual-learning metrics, from the full accuracy matrix (docs/methods.md#metrics).

A[j, i] is the accuracy (percent) on step i's test set after training step j, for every i,
also i > j (needed for Transfer). Indices here are 0-based; the formulas in docs/methods.md are
1-based. Metrics that need more than one step (transfer, forgetting, bwt) are None for T = 1.
"""

from __future__ import annotations

import numpy as np


def _matrix(acc) -> np.ndarray:
    a = np.asarray(acc, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"the accuracy matrix must be T x T with T >= 1, got shape {a.shape}")
    if np.isnan(a).any():
        raise ValueError("the accuracy matrix has missing entries (NaN)")
    return a


def last(acc) -> float:
    """Mean accuracy over all steps' test sets after the final step."""
    return float(_matrix(acc)[-1].mean())


def avg(acc) -> float:
    """MTIL "Avg": the mean of every entry, future steps included."""
    return float(_matrix(acc).mean())


def avg_incremental(acc, test_sizes) -> float:
    """CIL "Avg": the mean over steps j of the accuracy on the union of the test sets of steps <= j.

    The union's accuracy is the size-weighted mean of A[j, i] over i <= j."""
    a = _matrix(acc)
    n = np.asarray(test_sizes, dtype=np.float64)
    if n.shape != (a.shape[0],) or (n <= 0).any():
        raise ValueError("test_sizes needs one positive size per step")
    per_step = [float((a[j, :j + 1] * n[:j + 1]).sum() / n[:j + 1].sum()) for j in range(a.shape[0])]
    return float(np.mean(per_step))


def transfer(acc) -> float | None:
    """Mean over steps i >= 2 (1-based) of the mean accuracy on step i before it was trained."""
    a = _matrix(acc)
    t = a.shape[0]
    if t < 2:
        return None
    return float(np.mean([a[:i, i].mean() for i in range(1, t)]))


def forgetting(acc) -> float | None:
    """Mean over steps i < T of (best accuracy on i after learning it, before the last step) - final."""
    a = _matrix(acc)
    t = a.shape[0]
    if t < 2:
        return None
    return float(np.mean([a[i:t - 1, i].max() - a[t - 1, i] for i in range(t - 1)]))


def bwt(acc) -> float | None:
    """Backward transfer: mean over steps i < T of A[T, i] - A[i, i]."""
    a = _matrix(acc)
    t = a.shape[0]
    if t < 2:
        return None
    return float(np.mean([a[t - 1, i] - a[i, i] for i in range(t - 1)]))


def summarize(acc, test_sizes) -> dict:
    """Every metric of one accuracy matrix, as `metrics.json` records them."""
    a = _matrix(acc)
    return {"accuracy_matrix": a.tolist(), "last": last(a), "avg": avg(a),
            "avg_incremental": avg_incremental(a, test_sizes), "transfer": transfer(a),
            "forgetting": forgetting(a), "bwt": bwt(a)}
