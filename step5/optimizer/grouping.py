"""From a batch of trials' fold requests to the groups a runner trains, longest first
(docs/optimizer-internals.md#grouping)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from step5.protocol import TrainRequest, fusion_key

#: Trials in flight per device slot when neither the flag nor the policy sets B: with one, every batch
#: ends with the slots idle while its longest fold finishes (docs/benchmark.md measures it).
TRIALS_IN_FLIGHT_PER_SLOT = 2


def default_trials_in_flight(capacity: int) -> int:
    return TRIALS_IN_FLIGHT_PER_SLOT * max(1, capacity)


def fusion_groups(
    trial_requests: Mapping[int, Sequence[TrainRequest]],
    max_groups: int = 1,
    n_train: Mapping[str, int] | None = None,
) -> list[list[int]]:
    """Trial numbers grouped by their folds' :func:`~step5.protocol.fusion_key` (``n_train``: a fold file's
    training rows, resolving ``auto`` batch mode), in order of first appearance; with fewer groups than
    ``max_groups`` (slots), the largest are split by whole trials so that every slot gets work."""
    rows = n_train or {}
    by_key: dict[frozenset[tuple[Any, ...]], list[int]] = {}
    for number, requests in trial_requests.items():
        # A trial's folds may resolve to different batch plans (sizes straddling the auto
        # threshold); the worker then splits the pass, so group on the whole set of keys.
        keys = frozenset(fusion_key(r, rows.get(r.data_path)) for r in requests)
        by_key.setdefault(keys, []).append(number)
    groups = list(by_key.values())
    while len(groups) < max_groups:
        largest = max(range(len(groups)), key=lambda i: len(groups[i]))
        if len(groups[largest]) < 2:
            break
        g = groups[largest]
        groups[largest:largest + 1] = [g[: len(g) // 2 + len(g) % 2], g[len(g) // 2 + len(g) % 2:]]
    return groups


def estimated_cost(group: Sequence[TrainRequest]) -> float:
    # A rough relative cost: epochs x parameters-ish x models.
    return sum(r.params.epochs * (1 + sum(r.params.hidden_layers)) for r in group)


def plan_groups(
    trial_requests: Mapping[int, Sequence[TrainRequest]],
    *,
    fuse_folds: bool,
    fuse_trials: bool,
    capacity: int,
    n_train: Mapping[str, int] | None = None,
) -> list[list[TrainRequest]]:
    """The groups for one batch of trials, longest first (docs/optimizer-internals.md#grouping)."""
    if fuse_trials:
        groups = [[r for n in trials for r in trial_requests[n]]
                  for trials in fusion_groups(trial_requests, capacity, n_train)]
    elif fuse_folds:
        groups = [list(requests) for requests in trial_requests.values()]
    else:
        groups = [[r] for requests in trial_requests.values() for r in requests]
    # sorted() is stable: equal estimates keep the trial/fold order.
    return sorted(groups, key=estimated_cost, reverse=True)
