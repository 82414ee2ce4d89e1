"""The data path: reading a large survivors file, and handing one fold to a worker.

* Reading a survivors file as the pipeline writes it (``json.dump(records, fh,
  indent=2)``; 200k records x 90 features is about 700 MiB): ``load_survivors`` (Step 5)
  and the predictor's reader (``load_features``, what ``python -m step5.predictor`` calls),
  each against the standard library's ``json.load`` of the same file, side by side in one
  run. Every measurement runs in a fresh Python process (``python -m bench.datapath
  --measure ...``), so the memory figures do not inherit each other's heap:

  - time: wall-clock seconds of the call alone (imports excluded);
  - peak memory: the process's peak resident set (``VmHWM`` in ``/proc/self/status``)
    after the call minus its resident set (``VmRSS``) just before it, after the imports:
    the high-water mark the call added to the interpreter's baseline, Python objects and
    numpy buffers alike. The peak mark is reset just before the call (``echo 5 >
    /proc/self/clear_refs``) so the imports' own peak is not counted; where that is not
    allowed the figure can only be higher. (``ru_maxrss`` would not do: Linux carries it
    across fork and exec, so a child started by a parent that had a large heap reports
    the parent's peak.)

  Kinds run in interleaved rounds (json.load, load_survivors, reader, then again) after
  one warm-up read of the file, so the page cache and any load from other processes fall
  on all of them alike. The report gives each kind's median seconds and peak, and, for
  the ratios judged against the targets, the median over rounds of each round's ratio to
  that round's json.load (paired, as the two ran seconds apart). The file is generated once
  into the results folder and reused (a marker says it is complete).
* Per-fold hand-off, parent to worker: the parent writes the fold NPZ once (timed when
  the workload is built), sends a request line (its size is reported), and the worker
  reads the NPZ — a cache miss the first time a process sees the fold, a hit afterwards.
  The worker-side numbers come from the results' ``load_s`` (0 on a cache hit).

Torch-free: runs in the benchmark's parent. Standalone::

    python -m bench.datapath [--records 200000] [--features 90] [--rounds 3] [--out bench/results]
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from step5.data.sample import feature_names, write_sample
from step5.fsutil import atomic_output
from step5.jsonio import dumps_line, loads

from bench.workload import Workload, median

logger = logging.getLogger(__name__)

#: The reading paths measured, in the order each round runs them.
KINDS = ("json_load", "load_survivors", "predictor_reader")

#: Targets (issue 16): time as a fraction of json.load's, peak memory as a multiple of the file size.
TIME_TARGETS = {"load_survivors": 0.35, "predictor_reader": 0.5}
MEMORY_TARGET = 1.5


def ensure_indent2_file(data_dir: Path, n_records: int, n_features: int = 90, seed: int = 42) -> tuple[Path, float | None]:
    """The generated survivors file re-written by ``json.dump(records, fh, indent=2)``, as
    the upstream pipeline writes it; made once, reused later. Returns (path, seconds
    spent generating it, or None when it was already there)."""
    target = data_dir / f"survivors_{n_records}x{n_features}_s{seed}_indent2"
    path = target / "survivors_with_scores.json"
    marker = target / ".complete"
    if marker.exists() and path.exists():
        return path, None
    logger.info("generating %d survivors x %d features (json.dump indent=2) into %s (once; reused later)",
                n_records, n_features, target)
    start = time.perf_counter()
    compact, _ = write_sample(target / "compact", n_survivors=n_records, n_features=n_features, seed=seed)
    records = loads(compact.read_bytes())
    with atomic_output(path) as tmp, open(tmp, "w") as fh:
        json.dump(records, fh, indent=2)
    del records
    shutil.rmtree(target / "compact")
    marker.write_text("ok\n")
    return path, time.perf_counter() - start


def _proc_status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``: resident now, ``VmHWM``: peak)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Set the peak resident set (VmHWM) to the current one, where the kernel allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        logger.warning("cannot reset the peak RSS (/proc/self/clear_refs): peaks include the imports' own peak")


def _measure(kind: str, path: Path, names_file: Path | None) -> dict[str, Any]:
    """Run one reading path in this (fresh) process; its seconds and added peak memory."""
    from step5.data.survivors import load_features, load_survivors

    names = json.loads(names_file.read_text()) if names_file is not None else None
    gc.collect()
    _reset_peak_rss()
    base_kib = _proc_status_kib("VmRSS")
    cpu_start = time.process_time()
    start = time.perf_counter()
    if kind == "json_load":
        with open(path) as fh:
            result: Any = json.load(fh)
        n = len(result)
    elif kind == "load_survivors":
        result = load_survivors(path)
        n = result.n_records
    elif kind == "predictor_reader":
        if names is None:
            raise SystemExit("predictor_reader needs --names")
        result = load_features(path, names)
        n = result.n_records
    else:
        raise SystemExit(f"unknown kind {kind!r}; expected one of {KINDS}")
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    peak_kib = _proc_status_kib("VmHWM")
    return {"kind": kind, "records": n, "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_bytes": (peak_kib - base_kib) * 1024,
            "baseline_bytes": base_kib * 1024}


def _run_child(kind: str, path: Path, names_file: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.datapath", "--measure", kind, "--file", str(path), "--names", str(names_file)]
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} measurement failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def survivors_datapath(
    data_dir: Path, n_records: int, n_features: int = 90, seed: int = 42, *, rounds: int = 3
) -> dict[str, Any]:
    """Measure json.load, load_survivors and the predictor's reader on the indent=2 file,
    side by side (see the module docstring); returns the figures and the targets."""
    if rounds < 1:
        raise ValueError(f"`rounds` must be >= 1, got {rounds!r}")
    path, generate_s = ensure_indent2_file(data_dir, n_records, n_features, seed)
    names_file = path.parent / "feature_names.json"
    names_file.write_text(json.dumps(sorted(feature_names(n_features))))
    size = path.stat().st_size
    with open(path, "rb") as fh:  # warm the page cache once, so no kind pays for the disk
        while fh.read(64 << 20):
            pass
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    load_before = os.getloadavg()[0]
    for r in range(rounds):
        for kind in KINDS:
            res = _run_child(kind, path, names_file)
            runs[kind].append(res)
            logger.info("data path round %d/%d: %s %.2f s, peak +%.0f MiB", r + 1, rounds, kind, res["seconds"],
                        res["peak_bytes"] / 2**20)
    load_after = os.getloadavg()[0]
    per_kind = {
        kind: {
            "seconds": round(median([x["seconds"] for x in rs]), 3),
            "seconds_rounds": [round(x["seconds"], 3) for x in rs],
            "cpu_seconds": round(median([x["cpu_seconds"] for x in rs]), 3),
            "peak_mib": round(median([float(x["peak_bytes"]) for x in rs]) / 2**20, 1),
            "peak_x_file": round(median([float(x["peak_bytes"]) for x in rs]) / size, 3),
            "records": rs[0]["records"],
        }
        for kind, rs in runs.items()
    }
    targets = []
    for kind, bound in TIME_TARGETS.items():
        # Paired: each round's ratio to the json.load that ran seconds before it, then the
        # median over rounds, so a disturbance that hits one round does not skew the pair.
        value = median([x["seconds"] / j["seconds"] for x, j in zip(runs[kind], runs["json_load"])])
        value = round(value, 3)  # the row and the target line print the same number
        per_kind[kind]["x_json_load"] = value
        per_kind[kind]["cpu_x_json_load"] = round(
            median([x["cpu_seconds"] / max(j["cpu_seconds"], 1e-9) for x, j in zip(runs[kind], runs["json_load"])]), 3
        )
        targets.append({"text": f"{kind} time / json.load time", "value": value, "op": "<=", "bound": bound,
                        "held": value <= bound})
        peak = per_kind[kind]["peak_x_file"]
        targets.append({"text": f"{kind} peak memory / file size", "value": peak, "op": "<=", "bound": MEMORY_TARGET,
                        "held": peak <= MEMORY_TARGET})
    return {
        "path": str(path),
        "records": n_records,
        "features": n_features,
        "file_mib": round(size / 2**20, 1),
        "generate_s": None if generate_s is None else round(generate_s, 2),
        "rounds": rounds,
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "cpu_cores": os.cpu_count(),
        "kinds": per_kind,
        "targets": targets,
    }


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.datapath",
        description="Time and peak memory of reading a large survivors file: json.load vs load_survivors vs the "
        "predictor's reader, side by side.",
    )
    p.add_argument("--records", type=int, default=200_000, help="records in the generated file [200000]")
    p.add_argument("--features", type=int, default=90, help="model features per record [90]")
    p.add_argument("--seed", type=int, default=42, help="generator seed [42]")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each kind's median is reported [3]")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="results folder (file cached in OUT/data)")
    p.add_argument("--measure", choices=KINDS, help=argparse.SUPPRESS)  # child mode: one measurement
    p.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--names", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.measure:
        logging.disable(logging.WARNING)  # the generator's fill warning is not news here
        print(json.dumps(_measure(args.measure, args.file, args.names)), flush=True)
        return 0
    for name in ("records", "features", "rounds"):
        if getattr(args, name) < 1:
            build_parser().error(f"--{name} must be >= 1")
    from bench.report import format_survivors_datapath  # not in the measuring children

    data = survivors_datapath(args.out / "data", args.records, args.features, args.seed, rounds=args.rounds)
    report = "\n".join(["data path:", *format_survivors_datapath(data)])
    print(report, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "datapath.txt").write_text(report + "\n")
    (args.out / "datapath.json").write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
