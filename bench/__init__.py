"""The fold-runner benchmark: one neural-net workload through every way of running it.

``python -m bench.run_benchmark`` trains the same folds (a fixed hyperparameter sequence,
the same seeds, the same fold files) in each mode of :data:`bench.modes.MODES` and prints
a table of wall time, ratio to the warm in-process limit, per-fold overhead and metrics.
See ``docs/benchmark.md``.

Layout, parent side first (none of these import torch)::

    workload.py   the fixed params sequence, the fold NPZs, the TrainRequests
    modes.py      the mode table: s96a, s96b, loky, limit, limit1 (one entry per mode)
    limit.py      N warm processes training their share with no IPC while the clock runs
    datapath.py   survivors-file load and per-fold hand-off timings
    report.py     metric cross-check, targets, table, JSON, PNG
    run_benchmark.py  the command line

and the one module that runs inside child processes and imports torch there:
``inproc.py`` (the loky task and the limit process body).
"""
