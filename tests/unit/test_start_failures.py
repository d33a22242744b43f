"""The restart policy of dead actors (`deploy.cluster.StartFailures`): backoff, doubling, the cap, giving up."""

from __future__ import annotations

from deploy.cluster import RESTART_BACKOFF_CAP_S, StartFailures


def test_failed_starts_double_the_wait_up_to_the_cap() -> None:
    policy = StartFailures(max_failures=0, backoff_s=1.0)  # 0: never give up
    waits = [policy.died(0, generated=False) for _ in range(9)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert policy.failures[0] == 9
    assert all(policy.died(0, generated=False) == RESTART_BACKOFF_CAP_S for _ in range(2000))  # no overflow


def test_gives_up_at_max_failures_in_a_row() -> None:
    policy = StartFailures(max_failures=3, backoff_s=0.5)
    assert [policy.died(1, generated=False) for _ in range(3)] == [0.5, 1.0, None]
    assert policy.failures[1] == 3


def test_an_actor_that_generated_is_no_failed_start_and_resets_the_count() -> None:
    policy = StartFailures(max_failures=2, backoff_s=1.0)
    assert policy.died(0, generated=False) == 1.0
    assert policy.died(0, generated=True) == 1.0  # ran fine, then died: the first wait again, count reset
    assert policy.failures[0] == 0
    assert policy.died(0, generated=False) == 1.0  # one failure in a row, not two: no give-up yet
    assert policy.died(0, generated=False) is None
    assert all(policy.died(2, generated=True) == 1.0 for _ in range(10))  # deaths after generating never give up


def test_counts_are_per_actor_and_forgotten_when_scaled_away() -> None:
    policy = StartFailures(max_failures=2, backoff_s=1.0)
    assert policy.died(0, generated=False) == 1.0
    assert policy.died(1, generated=False) == 1.0
    policy.forget(0)
    assert policy.died(0, generated=False) == 1.0
    assert policy.died(1, generated=False) is None


def test_zero_backoff_restarts_at_once() -> None:
    policy = StartFailures(max_failures=0, backoff_s=0.0)
    assert [policy.died(0, generated=False) for _ in range(3)] == [0.0, 0.0, 0.0]
