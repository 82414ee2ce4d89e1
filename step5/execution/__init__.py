"""How neural-net folds get trained: one-shot subprocesses or persistent workers.

Both runners share one interface (:class:`step5.execution.runner.FoldRunner`), so the
optimizer never asks which one it holds; :func:`make_fold_runner` picks one.
"""
