"""From a batch of trials' fold requests to the groups a runner trains, longest first
(docs/optimizer-internals.md#grouping)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from step5.protocol import TrainRequest, fusion_key

#: Trials in flight per device slot when neither the flag nor the policy sets B. With one
#: trial per slot, every batch ends with the slots idle while the batch's longest fold
#: finishes; with two, that tail is spread over twice the work (default benchmark, 2 CPU
#: slots: S96B 1.06x the ideal parallel limit with one, 1.03x with two; docs/benchmark.md).
TRIALS_IN_FLIGHT_PER_SLOT = 2


def default_trials_in_flight(capacity: int) -> int:
    """B for neural nets when neither ``--trials-in-flight`` nor the policy sets it."""
    return TRIALS_IN_FLIGHT_PER_SLOT * max(1, capacity)


def fusion_groups(
    trial_requests: Mapping[int, Sequence[TrainRequest]],
    max_groups: int = 1,
    n_train: Mapping[str, int] | None = None,
) -> list[list[int]]:
    """Group trials whose folds can share one fused pass; returns lists of trial numbers.

    Trials are grouped by :func:`~step5.protocol.fusion_key` of their fold requests (layer
    widths, optimizer, epochs, batch plan, ...; learning rate, weight decay and dropout may
    differ per model). ``n_train`` maps a fold file to its training rows, which resolves an
    ``auto`` batch mode, so full-batch trials group whatever their (unused) batch sizes.
    Groups keep the order in which their first trial appears. When there are fewer groups
    than ``max_groups`` (device slots), the largest groups are split by whole trials so
    that every slot gets work; one fused pass per device is the point.
    """
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
    """A rough relative cost of training ``group``: epochs x parameters-ish x models."""
    return sum(r.params.epochs * (1 + sum(r.params.hidden_layers)) for r in group)


def plan_groups(
    trial_requests: Mapping[int, Sequence[TrainRequest]],
    *,
    fuse_folds: bool,
    fuse_trials: bool,
    capacity: int,
    n_train: Mapping[str, int] | None = None,
) -> list[list[TrainRequest]]:
    """The groups for one batch of trials (see the module doc), longest first."""
    if fuse_trials:
        groups = [[r for n in trials for r in trial_requests[n]]
                  for trials in fusion_groups(trial_requests, capacity, n_train)]
    elif fuse_folds:
        groups = [list(requests) for requests in trial_requests.values()]
    else:
        groups = [[r] for requests in trial_requests.values() for r in requests]
    # sorted() is stable: equal estimates keep the trial/fold order.
    return sorted(groups, key=estimated_cost, reverse=True)
