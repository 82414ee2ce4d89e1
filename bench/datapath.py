"""The data path: loading a large survivors file, and handing one fold to a worker.

* ``load_survivors`` on a generated 200k-record x 90-feature file (SPEC: "a 200k-record
  file must load in seconds"). The file is generated once into the results folder and
  reused on later runs (generation is deterministic; a marker says it is complete).
* Per-fold hand-off, parent to worker: the parent writes the fold NPZ once (timed when
  the workload is built), sends a request line (its size is reported), and the worker
  reads the NPZ — a cache miss the first time a process sees the fold, a hit afterwards.
  The worker-side numbers come from the results' ``load_s`` (0 on a cache hit).

Torch-free: runs in the benchmark's parent.
"""
from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

from step5.data.sample import write_sample
from step5.data.survivors import load_survivors
from step5.jsonio import dumps_line

from bench.workload import Workload, median

logger = logging.getLogger(__name__)


def time_survivors_load(data_dir: Path, n_records: int, n_features: int = 90, seed: int = 42) -> dict[str, Any]:
    """Generate (once) and load a large survivors file; returns sizes and seconds."""
    target = data_dir / f"survivors_{n_records}x{n_features}_s{seed}"
    path = target / "survivors_with_scores.json"
    marker = target / ".complete"
    generate_s: float | None = None
    if not (marker.exists() and path.exists()):
        logger.info("generating %d survivors x %d features into %s (once; reused later)", n_records, n_features, target)
        start = time.perf_counter()
        write_sample(target, n_survivors=n_records, n_features=n_features, seed=seed)
        generate_s = time.perf_counter() - start
        marker.write_text("ok\n")
    size = path.stat().st_size
    gc.collect()
    start = time.perf_counter()
    table = load_survivors(path)
    load_s = time.perf_counter() - start
    out = {
        "path": str(path),
        "records": int(table.n_records),
        "features": int(table.n_features),
        "file_mb": round(size / 2**20, 1),
        "load_s": round(load_s, 3),
        "mb_per_s": round(size / 2**20 / load_s, 1) if load_s > 0 else None,
        "generate_s": None if generate_s is None else round(generate_s, 2),
    }
    del table
    gc.collect()
    logger.info("load_survivors: %d records in %.2fs (%.0f MB)", out["records"], load_s, out["file_mb"])
    return out


def _cache_hit(result: Mapping[str, Any]) -> bool:
    if "cache_hit" in result:
        return bool(result["cache_hit"])
    return float(result.get("load_s", 0.0)) == 0.0


def handoff_stats(
    workload: Workload,
    results_by_mode: Mapping[str, list[dict[str, Any]]],
    runner_timings: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Per-fold hand-off costs: parent NPZ write, request size, worker NPZ load miss/hit,
    and each runner's own count of what a job cost beyond its work (``runner_timings``:
    the ``timings`` block of ``summary()``: job wall as the runner saw it - duration)."""
    request_bytes = [len(dumps_line(r.to_dict())) for r in workload.requests]
    per_mode: dict[str, Any] = {}
    for name, results in results_by_mode.items():
        miss = [float(r.get("load_s", 0.0)) for r in results if not _cache_hit(r)]
        hit = [float(r.get("load_s", 0.0)) for r in results if _cache_hit(r)]
        per_mode[name] = {
            "misses": len(miss),
            "hits": len(hit),
            "load_ms_miss_median": round(median(miss) * 1e3, 3) if miss else None,
            "load_ms_hit_median": round(median(hit) * 1e3, 3) if hit else None,
        }
        timings = (runner_timings or {}).get(name)
        if timings and timings.get("jobs"):
            # The runner's totals include the warm-up round; per job it is the same cost.
            per_mode[name]["runner_overhead_ms_per_job"] = round(
                float(timings.get("overhead_s", 0.0)) / int(timings["jobs"]) * 1e3, 3
            )
    return {
        "npz_write_ms_median": round(median(workload.fold_write_s) * 1e3, 3),
        "npz_kb": round(median([float(b) for b in workload.fold_bytes]) / 1024, 1),
        "request_line_bytes_median": int(median([float(b) for b in request_bytes])),
        "fold_dir": str(workload.fold_files.path),
        "fold_dir_fs": _filesystem_of(workload.fold_files.path),
        "worker_load": per_mode,
    }


def _filesystem_of(path: Path) -> str:
    """The mount's filesystem type (tmpfs vs disk matters for NPZ hand-off)."""
    best, fstype = "", "unknown"
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                    best, fstype = parts[1], parts[2]
    except OSError:
        pass
    return fstype if os.path.exists(path) else "unknown"
