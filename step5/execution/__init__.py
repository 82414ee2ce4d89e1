"""How neural-net folds get trained: one-shot subprocesses or persistent workers.

Both runners share one entry point, ``run(groups) -> outcomes``
(:class:`step5.execution.runner.FoldRunner`), so the optimizer never asks which one it
holds; :func:`step5.execution.factory.make_fold_runner` picks one.

Modules: ``runner`` (the interface, the one-shot runner), ``pool`` (persistent workers,
dispatch), ``worker_process`` (one worker process and its pipes), ``slot`` (the slot's
restart/fallback state machine, pure), ``oneshot`` (the retrying one-shot path),
``process`` (kill, bounded reap, exit status; shared with the WATCHER), ``summary`` (the
sidecar's typed ``execution`` block).
"""
