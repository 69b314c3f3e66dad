"""The process pool's batching policy, on its own: how many calls a worker gets ahead of time."""

from taskrun.runners.process._batching import AHEAD_SECONDS, CALL_OVERHEAD, MAX_BATCH, BatchPolicy


def test_a_cold_pool_sends_one_call_at_a_time() -> None:
    policy = BatchPolicy()
    assert policy.call_seconds == AHEAD_SECONDS
    assert policy.depth(waiting=1000, workers=2) == 1


def test_short_calls_go_many_to_a_worker_up_to_the_cap() -> None:
    policy = BatchPolicy()
    for _ in range(100):
        policy.observe(1e-6)
    assert policy.call_seconds < 2 * (1e-6 + CALL_OVERHEAD)
    assert policy.depth(waiting=100_000, workers=2) == MAX_BATCH
    assert policy.depth(waiting=40, workers=2) == 20  # no more than the backlog shared out
    assert policy.depth(waiting=2, workers=2) == 1  # no backlog: one each


def test_slow_calls_go_one_at_a_time() -> None:
    policy = BatchPolicy()
    for _ in range(50):
        policy.observe(0.5)
    assert policy.depth(waiting=1000, workers=2) == 1


def test_the_average_follows_a_change_of_pace() -> None:
    policy = BatchPolicy()
    for _ in range(50):
        policy.observe(1e-5)
    fast = policy.depth(waiting=10_000, workers=2)
    for _ in range(50):
        policy.observe(0.02)
    assert fast > 1 and policy.depth(waiting=10_000, workers=2) == 1


def test_fresh_processes_take_one_call_each() -> None:
    policy = BatchPolicy(fresh=True)
    for _ in range(100):
        policy.observe(1e-6)
    assert policy.depth(waiting=10_000, workers=2) == 1


def test_a_busy_worker_is_topped_up_only_once_it_runs_low_and_only_with_a_backlog() -> None:
    assert BatchPolicy.tops_up(held=10, depth=64)
    assert BatchPolicy.tops_up(held=32, depth=64)
    assert not BatchPolicy.tops_up(held=33, depth=64)
    assert not BatchPolicy.tops_up(held=0, depth=1)  # one at a time: only idle workers get calls
