#!/usr/bin/env python3
"""Persistent neural-net worker (the S96B path): one per GPU, started by the Step 5 pool.

Boots torch once, writes ``{"status": "ready", ...}``, then answers newline-delimited JSON
requests (``train``, ``train_folds``, ``ping``, ``shutdown``) on stdin with one JSON line
each on stdout; logs go to stderr. See ``docs/workers.md`` and :mod:`step5.nn.worker`.

    echo '{"command": "ping"}' | CUDA_VISIBLE_DEVICES=0 python3 nn_gpu_worker.py
"""
from step5.nn.worker import main

if __name__ == "__main__":
    raise SystemExit(main())
