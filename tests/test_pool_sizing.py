"""The pool's sizing decisions (kwserver.autoscaler.ScalingPolicy), as pure functions of time and load."""

from kwserver.autoscaler import COOLDOWN_SECONDS, ScalingPolicy


def _idle_for(policy: ScalingPolicy, workers: int, utilisation: float, seconds: int) -> list[int]:
    return [policy.decide(float(t), utilisation, workers) for t in range(seconds + 1)]


def test_an_idle_pool_returns_to_its_minimum_in_one_step():
    policy = ScalingPolicy(min_workers=1, max_workers=8, grow_after=3, shrink_after=30)
    steps = _idle_for(policy, workers=6, utilisation=0.0, seconds=30)
    assert steps == [0] * 30 + [-5]


def test_a_lightly_loaded_pool_keeps_what_the_load_needs():
    # 6 workers 20 % busy: 1.2 busy workers, 3 at the 50 % target.
    policy = ScalingPolicy(min_workers=1, max_workers=8, grow_after=3, shrink_after=10)
    assert _idle_for(policy, workers=6, utilisation=0.2, seconds=10)[-1] == -3


def test_growth_stays_one_worker_per_cool_down():
    policy = ScalingPolicy(min_workers=1, max_workers=8, grow_after=2, shrink_after=30)
    steps = [policy.decide(float(t), 1.0, 2) for t in range(12)]
    grown_at = [t for t, step in enumerate(steps) if step]
    assert grown_at == [2, 2 + COOLDOWN_SECONDS] and all(steps[t] == 1 for t in grown_at)
