"""How neural-net folds get trained: persistent workers or one-shot trainers, one runner
(:class:`step5.execution.pool.WorkerPool`); docs/workers.md maps the modules."""
