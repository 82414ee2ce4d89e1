#!/usr/bin/env python3
"""One-shot neural-net trainer (the S96A path): one fold, one process, one JSON line.

A thin door into :mod:`step5.nn.oneshot`; flags and output are described there and in
docs/training.md. Stdout is claimed before anything else is imported, so only the result
line can reach it.
"""
from __future__ import annotations

if __name__ == "__main__":
    from step5.stdout_guard import claim_stdout

    claim_stdout()
    try:
        from step5.nn.oneshot import main
    except ModuleNotFoundError as exc:
        from step5.launch import missing_dependency

        raise SystemExit(missing_dependency(exc)) from None
    main()
