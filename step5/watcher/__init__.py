"""The WATCHER: runs pipeline steps as subprocesses, judges them, keeps the decision log and
the model skip registry (SPEC section 9).

Modules: ``steps`` (which steps exist and how ``--params`` map to their flags), ``process``
(running a step in its own process group, with a timeout), ``judge`` (exit code + sidecar +
policy -> decision), ``decision_log`` (append-only JSONL), ``registry`` (the skip registry,
also read by Step 5's compare runs), ``pipeline`` (the retry loop), ``cli``.

Only the registry is re-exported here, so that Step 5 importing it stays light.
"""
from __future__ import annotations

from step5.watcher.registry import (
    DEFAULT_REGISTRY_PATH,
    load_skip_registry,
    record_result,
    skipped_model_types,
)

__all__ = ["DEFAULT_REGISTRY_PATH", "load_skip_registry", "record_result", "skipped_model_types"]
