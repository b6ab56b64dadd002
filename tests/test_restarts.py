"""hetserve up's restart policy: exponential backoff, capped; a long life resets it; a crash
loop is given up."""

from services.cli.restarts import RestartPolicy


def test_quick_deaths_back_off_then_give_up() -> None:
    policy = RestartPolicy(first_s=0.5, cap_s=3.0, quick_s=10.0, max_quick=5)
    waits = [policy.after_death("d-0", lived_s=1.0) for _ in range(5)]
    assert waits == [1.0, 2.0, 3.0, 3.0, None]


def test_a_long_life_resets_the_backoff() -> None:
    policy = RestartPolicy(first_s=0.5, cap_s=30.0, quick_s=10.0, max_quick=3)
    assert policy.after_death("p-0", lived_s=1.0) == 1.0
    assert policy.after_death("p-0", lived_s=1.0) == 2.0
    assert policy.after_death("p-0", lived_s=600.0) == 0.5
    assert policy.after_death("other", lived_s=1.0) == 1.0
