"""The worker pool's scaling decisions (pure) and the recycling of workers over their memory ceiling."""

from __future__ import annotations

import itertools
import subprocess
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from kwserver.config import GROW_ABOVE, SHRINK_BELOW
from kwserver.server.autoscaler import COOLDOWN_SECONDS, PoolController, ScalingPolicy

BUSY, IDLE, STEADY = 0.9, 0.1, 0.5


def _policy(min_workers=1, max_workers=3, grow_after=3.0, shrink_after=10.0) -> ScalingPolicy:
    return ScalingPolicy(min_workers, max_workers, grow_after, shrink_after)


def _run(policy: ScalingPolicy, utilisation: float, workers: int, start: float, seconds: int) -> list[int]:
    """Decisions once a second over `seconds`, the pool following each decision."""
    decisions = []
    for now in range(int(start), int(start) + seconds):
        step = policy.decide(float(now), utilisation, workers)
        workers += step
        decisions.append(step)
    return decisions


def test_grows_only_after_sustained_load():
    policy = _policy(grow_after=3)
    assert _run(policy, BUSY, 1, 100, 4) == [0, 0, 0, 1]


def test_a_dip_in_load_restarts_the_wait():
    policy = _policy(grow_after=3)
    assert _run(policy, BUSY, 1, 100, 2) == [0, 0]
    assert policy.decide(102.0, STEADY, 1) == 0
    assert _run(policy, BUSY, 1, 103, 4) == [0, 0, 0, 1]


def test_never_grows_beyond_max_workers():
    policy = _policy(max_workers=2, grow_after=1)
    assert _run(policy, BUSY, 2, 100, 60) == [0] * 60


def test_never_shrinks_below_min_workers():
    policy = _policy(min_workers=2, shrink_after=1)
    assert _run(policy, IDLE, 2, 100, 60) == [0] * 60


def test_shrinks_after_sustained_idleness():
    policy = _policy(shrink_after=10)
    # Straight to what the load needs (0.3 busy workers: one), not one worker per period.
    assert _run(policy, IDLE, 3, 100, 11) == [0] * 10 + [-2]


def test_an_idle_pool_returns_to_its_minimum_in_one_step():
    policy = ScalingPolicy(min_workers=1, max_workers=8, grow_after=3, shrink_after=30)
    assert [policy.decide(float(t), 0.0, 6) for t in range(31)] == [0] * 30 + [-5]


def test_a_lightly_loaded_pool_keeps_what_the_load_needs():
    # 6 workers 20 % busy: 1.2 busy workers, 3 at the 50 % target.
    policy = ScalingPolicy(min_workers=1, max_workers=8, grow_after=3, shrink_after=10)
    assert [policy.decide(float(t), 0.2, 6) for t in range(11)][-1] == -3


def test_steady_load_changes_nothing():
    assert _run(_policy(grow_after=0, shrink_after=0), STEADY, 2, 100, 30) == [0] * 30
    # The thresholds themselves are neither busy nor idle.
    assert _run(_policy(grow_after=0, shrink_after=0), GROW_ABOVE, 2, 100, 10) == [0] * 10
    assert _run(_policy(grow_after=0, shrink_after=0), SHRINK_BELOW, 2, 100, 10) == [0] * 10


def test_cool_down_after_every_change():
    policy = _policy(max_workers=5, grow_after=0)
    decisions = _run(policy, BUSY, 1, 100, 16)
    grown_at = [100 + i for i, step in enumerate(decisions) if step]
    assert grown_at == [100, 100 + COOLDOWN_SECONDS, 100 + 2 * COOLDOWN_SECONDS, 100 + 3 * COOLDOWN_SECONDS]
    # After growing, idleness must last its own full wait: the change reset it.
    policy = _policy(grow_after=0, shrink_after=8)
    assert policy.decide(100.0, BUSY, 1) == 1
    assert _run(policy, IDLE, 2, 101, 9) == [0] * 8 + [-1]


def test_a_pool_outside_its_bounds_is_brought_back():
    assert _policy(min_workers=2).decide(100.0, STEADY, 1) == 1
    assert _policy(max_workers=3).decide(100.0, STEADY, 5) == -1


@settings(max_examples=200, deadline=None)
@given(
    bounds=st.tuples(st.integers(1, 4), st.integers(0, 4)),
    waits=st.tuples(st.integers(0, 4), st.integers(0, 4)),
    # Sample gaps around the controller's one second; loads on both sides of both thresholds.
    trace=st.lists(st.tuples(st.sampled_from([0.2, 1.0, 1.0, 2.5]), st.sampled_from([0.0, 0.2, 0.5, 0.8, 1.0])),
                   min_size=1, max_size=80),
)
def test_any_load_keeps_the_pool_in_bounds_with_changes_a_cool_down_apart(bounds, waits, trace):
    low, extra = bounds
    policy = ScalingPolicy(low, low + extra, float(waits[0]), float(waits[1]))
    workers, now, changes, busy_since = low, 1000.0, [], None
    for gap, utilisation in trace:
        now += gap
        busy_since = (busy_since or now) if utilisation > GROW_ABOVE else None
        step = policy.decide(now, utilisation, workers)
        if step > 0:
            # Growth needs load above the threshold, sustained for the whole wait.
            assert busy_since is not None and now - busy_since >= waits[0]
            busy_since = None
        if step < 0:
            assert utilisation < SHRINK_BELOW
        if step:
            changes.append(now)
        workers += step
        assert low <= workers <= low + extra
    assert all(later - earlier >= COOLDOWN_SECONDS for earlier, later in itertools.pairwise(changes))


def test_workers_over_the_memory_ceiling_get_sigterm_and_the_others_do_not():
    big, small = (subprocess.Popen(["sleep", "60"]) for _ in range(2))
    uss = {big.pid: 200 << 20, small.pid: 10 << 20}
    controller = PoolController(policy=None, max_uss_bytes=100 << 20, busy_seconds=lambda: 0.0,
                                workers=lambda: {big.pid: 1, small.pid: 2}, uss=uss.get,
                                resize=lambda workers: None)
    controller.start()
    try:
        assert big.wait(timeout=10) == -15  # SIGTERM: gunicorn retires the worker gracefully
        time.sleep(1.5)  # another sample: the other worker stays
        assert small.poll() is None
    finally:
        controller.stop()
        for process in (big, small):
            process.kill()
            process.wait()


def test_the_controller_resizes_the_pool_up_and_then_down():
    """The controller sets the pool's size (the arbiter's worker count) as the load asks."""
    sizes: list[int] = []
    busy = {"load": 1.0, "total": 0.0, "at": time.monotonic()}

    def busy_seconds():  # one worker, fully busy (load 1.0) or idle (load 0.0) since the last sample
        now = time.monotonic()
        busy["total"] += (now - busy["at"]) * busy["load"]
        busy["at"] = now
        return busy["total"]

    controller = PoolController(policy=ScalingPolicy(1, 2, 0.0, 0.0), max_uss_bytes=0, busy_seconds=busy_seconds,
                                workers=lambda: dict.fromkeys(range(sizes[-1] if sizes else 1), 1),
                                uss=lambda pid: None, resize=sizes.append)
    controller.start()
    try:
        deadline = time.monotonic() + 20
        while 2 not in sizes and time.monotonic() < deadline:
            time.sleep(0.05)
        busy["load"] = 0.0
        deadline = time.monotonic() + 20  # the cool-down passes first
        while sizes[-1:] != [1] and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        controller.stop()
    assert sizes[:1] == [2] and sizes[-1] == 1


def test_a_worker_still_draining_does_not_keep_the_others_from_being_checked():
    first, second = (subprocess.Popen(["sleep", "60"]) for _ in range(2))
    uss = {first.pid: 200 << 20, second.pid: 10 << 20}
    # gunicorn lists a retiring worker until it has drained: the first stays listed after its SIGTERM.
    controller = PoolController(policy=None, max_uss_bytes=100 << 20, busy_seconds=lambda: 0.0,
                                workers=lambda: {first.pid: 1, second.pid: 2}, uss=uss.get,
                                resize=lambda workers: None)
    controller.start()
    try:
        assert first.wait(timeout=10) == -15
        uss[second.pid] = 300 << 20  # the second grows later
        assert second.wait(timeout=10) == -15
    finally:
        controller.stop()
        for process in (first, second):
            process.kill()
            process.wait()
