"""What an ended helper's host comes to (step5.cluster.HelperRecord), as a table."""
from __future__ import annotations

import pytest

from step5.cluster import HelperAction, HelperRecord

R, D, S, U, Q = (HelperAction.RESTART, HelperAction.DONE, HelperAction.STOPPED, HelperAction.UNREACHABLE,
                 HelperAction.QUARANTINED)

# Each row: the ends in order as (returncode, connected, stopping), the actions they give,
# the restart pauses (max_failures 3, restart_delay_s 5), and the state at the end.
TABLE = [
    ([(0, True, False)], [D], [], "done"),
    ([(1, True, False), (0, True, False)], [R, D], [5.0], "done"),
    ([(255, False, False)], [U], [], "unreachable"),  # never answered: skipped at once
    ([(-9, True, False), (255, False, False), (1, True, False)], [R, R, Q], [5.0, 10.0], "quarantined"),
    ([(255, True, False)] * 3, [R, R, Q], [5.0, 10.0], "quarantined"),  # killed remote command / lost connection
    ([(64, True, False)], [Q], [], "quarantined"),  # a usage error repeats: no retry
    ([(127, True, False)], [Q], [], "quarantined"),  # python_env not found on the host: would repeat
    ([(126, True, False)], [Q], [], "quarantined"),  # ... or not executable
    ([(1, True, False), (143, True, True)], [R, S], [5.0], "stopped"),
    ([(0, True, True)], [S], [], "stopped"),
]


@pytest.mark.parametrize("ends, actions, pauses, state", TABLE)
def test_helper_ends(ends, actions, pauses, state):
    record = HelperRecord("rig-1", max_failures=3, restart_delay_s=5.0)
    got, waits = [], []
    for returncode, connected, stopping in ends:
        record.on_start()
        action, delay = record.on_exit(returncode, connected=connected, stopping=stopping)
        got.append(action)
        if action is HelperAction.RESTART:
            waits.append(delay)
    assert got == actions and waits == pauses and record.state == state
    assert record.starts == len(ends) and len(record.history) == len(ends)


def test_a_helper_that_ran_long_before_it_ended_starts_its_failure_count_afresh():
    """Three lost connections spread over a long healthy study quarantined the host."""
    record = HelperRecord("rig-1", max_failures=3, restart_delay_s=5.0, healthy_s=600.0)
    for _ in range(5):  # each after an hour of work: the first failure again, every time
        record.on_start()
        assert record.on_exit(255, connected=True, stopping=False, ran_s=3600.0) == (HelperAction.RESTART, 5.0)
    record.on_start()
    assert record.on_exit(1, connected=True, stopping=False, ran_s=599.0) == (HelperAction.RESTART, 10.0)
    record.on_start()
    assert record.on_exit(1, connected=True, stopping=False, ran_s=1.0)[0] is HelperAction.QUARANTINED
    assert record.reason == "its helper failed 3 time(s)"


@pytest.mark.parametrize("kwargs, message", [({"max_failures": 0}, "max_failures"), ({"restart_delay_s": -1}, "restart")])
def test_bad_limits_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HelperRecord("rig-1", **kwargs)
