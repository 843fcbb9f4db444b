"""Every metric against hand-computed matrices, including the edge cases (one step, zero accuracy)."""

import math

import pytest

from uniil.trainer import metrics

# A[j][i]: rows = after step j, columns = step i's test set.
A = [[80.0, 10.0, 5.0],
     [60.0, 90.0, 20.0],
     [50.0, 70.0, 95.0]]


def test_hand_computed_three_steps():
    assert metrics.last(A) == pytest.approx((50 + 70 + 95) / 3)
    assert metrics.avg(A) == pytest.approx(sum(map(sum, A)) / 9)
    # Transfer: step 2 seen before training by row 1 (10); step 3 by rows 1-2 (5, 20) -> mean 12.5.
    assert metrics.transfer(A) == pytest.approx((10 + (5 + 20) / 2) / 2)
    # Forgetting: step 1 best before last = max(80, 60) = 80, final 50 -> 30; step 2: 90 - 70 = 20.
    assert metrics.forgetting(A) == pytest.approx((30 + 20) / 2)
    # BWT: (50 - 80 + 70 - 90) / 2.
    assert metrics.bwt(A) == pytest.approx(-25.0)
    # Avg incremental with equal test sets: mean of 80, (60+90)/2, (50+70+95)/3.
    assert metrics.avg_incremental(A, [100, 100, 100]) == pytest.approx((80 + 75 + 215 / 3) / 3)
    # ...and with unequal ones the union is size-weighted: step 2 = (60*100 + 90*300) / 400.
    assert metrics.avg_incremental(A, [100, 300, 100]) == pytest.approx(
        (80 + (60 * 100 + 90 * 300) / 400 + (50 * 100 + 70 * 300 + 95 * 100) / 500) / 3)


def test_forgetting_uses_the_best_accuracy_before_the_last_step_only():
    # Step 1 peaks at row 2 (a later step helped it), then drops at the end.
    a = [[40.0, 0.0, 0.0], [70.0, 50.0, 0.0], [30.0, 50.0, 60.0]]
    assert metrics.forgetting(a) == pytest.approx(((70 - 30) + (50 - 50)) / 2)
    assert metrics.bwt(a) == pytest.approx(((30 - 40) + (50 - 50)) / 2)


def test_one_step_and_zero_accuracy():
    one = [[42.0]]
    s = metrics.summarize(one, [10])
    assert s["last"] == s["avg"] == s["avg_incremental"] == 42.0
    assert s["transfer"] is None and s["forgetting"] is None and s["bwt"] is None
    zero = [[0.0, 0.0], [0.0, 0.0]]
    s = metrics.summarize(zero, [5, 5])
    assert (s["last"], s["avg"], s["transfer"], s["forgetting"], s["bwt"]) == (0.0, 0.0, 0.0, 0.0, 0.0)
    assert not any(isinstance(v, float) and math.isnan(v) for v in s.values())


def test_bad_matrices_are_refused():
    for bad in ([], [[1.0, 2.0]], [[1.0, float("nan")], [1.0, 1.0]]):
        with pytest.raises(ValueError):
            metrics.summarize(bad, [1] * max(1, len(bad)))
    with pytest.raises(ValueError):
        metrics.avg_incremental(A, [1, 2])
