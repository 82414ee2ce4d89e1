"""How neural-net folds get trained: persistent workers, or one-shot subprocesses.

One runner, :class:`step5.execution.pool.WorkerPool`, serves both (a one-shot pool is one
whose every slot runs where a fallen-back slot runs), behind one entry point,
``run(groups) -> outcomes`` (:class:`step5.execution.runner.FoldRunner`), so the optimizer
never asks which it holds; :func:`step5.execution.pool.make_fold_runner` builds it.

Modules: ``runner`` (the interface), ``pool`` (slots, dispatch, faults, statistics),
``worker_process`` (one training process and its pipes: the protocol's endpoint), ``slot``
(the slot's restart/fallback state machine, pure), ``oneshot`` (one attempt of a one-shot
job), ``process`` (kill, bounded reap, exit status; shared with the WATCHER), ``summary``
(the sidecar's typed ``execution`` block).
"""
