"""Fixtures of the tree-model tests."""
from __future__ import annotations

import pytest

from step5.models import trees


@pytest.fixture
def xgboost_sees_a_gpu(monkeypatch):
    """xgboost's GPU probe passes, as on a host with a GPU, so a test can follow a fit asked onto a
    GPU on this machine (it has none): the ordinals probed, in order."""
    probes: list[int] = []
    monkeypatch.setattr(trees.ADAPTERS["xgboost"], "gpu_unsupported_reason", lambda gpu_id: probes.append(gpu_id))
    return probes
