"""The WATCHER: runs pipeline steps as subprocesses, judges them, keeps the decision log and
the model skip registry (SPEC section 9; docs/watcher.md). Nothing is imported here, so
the optimizer importing :mod:`step5.watcher.registry` stays light."""
