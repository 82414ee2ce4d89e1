"""The pipeline's whole cluster on one machine: one command on the coordinator, 26 GPU slots.

    .venv/bin/python -m bench.cluster_layout [--trials 312] [--job-sleep-s 3.0] [--k-folds 5]
        [--scenarios steady,kill] [--out bench/results]

The layout is the pipeline's (distributed_config.json): a coordinator with 2 NVIDIA GPUs
that runs the main process, and three ROCm rigs with 8 AMD GPUs each, 26 slots. Here:

* the main process is the real optimizer CLI with ``--cluster-config``, its 2 "GPUs" given
  by ``CUDA_VISIBLE_DEVICES=0,1``;
* a stand-in ``ssh`` on PATH runs each rig's command on this machine
  (:mod:`step5.testing.standins`), so the helpers are started, streamed, stopped and
  restarted by the real fleet (:mod:`step5.cluster`) from the real command line;
* each rig's ``python_env`` is a stand-in that puts a stand-in ``rocm-smi`` reporting 8 GPUs
  on PATH and hides the NVIDIA ones, so each helper finds 8 AMD GPUs and plans 8 ROCm slots
  by itself;
* every process trains with a fake fold runner whose jobs sleep ``--job-sleep-s`` per fold
  on its slots (:mod:`step5.testing.fake_search`): everything else is real -- the study on
  one throwaway PostgreSQL 15 server, its lock, the count before each ask, heartbeats,
  the sampler, every storage write.

Scenarios: ``steady`` (all four processes to the end) measures the study's trial rate in
the steady state (from the moment every process has asked its first trial to the moment
the first one told its last) against the ideal, 26 slots / (K folds x sleep); ``kill``
SIGKILLs one rig's helper when a third of the trials are complete, as a crashed rig would
die. Both check the study: exactly ``--trials`` complete trials, none running, no
configuration twice among them, each trial told once, every helper host's end logged, and
for ``kill``: the killed helper's trials re-run and the rig restarted by the fleet.

Prints one row per scenario and the target (steady rate >= 85% of ideal); exit 0 when
every check held and the target was met, 3 otherwise, 1 on an error.

Why folds of 3 s. What the simulation cannot share out is each process's own CPU per
trial (Optuna's sampler and storage writes, about 0.2 s per trial here): on the real
cluster each host pays it on its own cores, here four processes pay it on two cores
shared with other work. The search loop does it in a helper thread while a batch trains
(step5.optimizer.search.Prefetch), but on two loaded cores the helper can still be late,
and the slots then wait for it. A fold must stay long
against it for the rate to measure coordination rather than this machine: 3 s (a trial of
5 folds is 15 s of one slot) is between an H100's fold (0.1-0.5 s, docs/benchmark.md) and
an RX 6600's fold of a 30-120 s trial (6-24 s, docs/cluster.md). docs/cluster.md gives
the figures for other fold lengths too.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from step5.cluster import ENTRY_SCRIPT
from step5.jsonio import read_json_file, write_json_atomic
from step5.testing.standins import write_fake_ssh, write_host_python, write_rocm_smi

logger = logging.getLogger("bench.cluster_layout")
REPO_ROOT = Path(__file__).resolve().parent.parent
TARGET_EFFICIENCY = 0.85
RIG_ENV = {"HSA_OVERRIDE_GFX_VERSION": "10.3.0", "HSA_ENABLE_SDMA": "0"}


@dataclass(frozen=True)
class Layout:
    """The simulated cluster."""

    main_gpus: int = 2  # the coordinator's NVIDIA GPUs
    rigs: int = 3  # ROCm rigs
    rig_gpus: int = 8  # AMD GPUs per rig
    trials: int = 312  # complete trials the study must hold
    k_folds: int = 5  # the optimizer's default, as the pipeline runs it
    job_sleep_s: float = 3.0  # one fold on one slot (module doc: why this long)

    @property
    def slots(self) -> int:
        return self.main_gpus + self.rigs * self.rig_gpus

    @property
    def ideal_trials_per_s(self) -> float:
        return self.slots / (self.k_folds * self.job_sleep_s)


def _write_cluster(folder: Path, layout: Layout) -> tuple[Path, Path, dict[str, str]]:
    """Stand-in tools, the rigs' python, the policy and distributed_config.json; returns
    (config path, policy path, the main process's environment)."""
    bin_dir, rocm_bin, pids = folder / "bin", folder / "rocm-bin", folder / "pids"
    pids.mkdir(parents=True)
    write_fake_ssh(bin_dir, log=folder / "ssh.log", require=["BatchMode=yes", "ConnectTimeout=10"])
    write_rocm_smi(rocm_bin, layout.rig_gpus)
    rig_python = write_host_python(
        folder / "rig_python",
        module_args=["-m", "step5.testing.fake_search", "--job-sleep-s", str(layout.job_sleep_s),
                     "--timings-out", str(folder / "timings-{pid}.json"), "--"],
        unset=["CUDA_VISIBLE_DEVICES"], path_first=[rocm_bin], pid_dir=pids,
    )
    policy = folder / "policy.json"
    policy.write_text(json.dumps({"training": {"device_env": RIG_ENV, "worker_spawn_stagger_s": 0}}))
    nodes = [{"hostname": "localhost", "username": os.environ.get("USER", "step5"), "gpu_count": layout.main_gpus,
              "gpu_type": "RTX 3080 Ti", "script_path": str(folder), "python_env": sys.executable}]
    for i in range(1, layout.rigs + 1):
        checkout = folder / "nodes" / f"rig-{i}"
        checkout.mkdir(parents=True)
        (checkout / ENTRY_SCRIPT).touch()  # a rig's checkout holds the entry script (its stand-in python ignores it)
        nodes.append({"hostname": f"rig-{i}", "username": "michael", "gpu_count": layout.rig_gpus,
                      "gpu_type": "RX 6600", "script_path": str(checkout), "python_env": str(rig_python),
                      "max_concurrent_script_jobs": layout.rig_gpus})
    config = folder / "distributed_config.json"
    config.write_text(json.dumps({"nodes": nodes}, indent=2))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(layout.main_gpus)),
           "PYTHONPATH": str(REPO_ROOT), "TMPDIR": str(folder)}
    return config, policy, env


def _progress(url: str, name: str, pid_file: Path) -> tuple[int, int]:
    """(complete trials in the study, trials running in the process of ``pid_file``)."""
    from optuna.trial import TrialState

    from step5.testing import stored_trials

    try:
        trials = stored_trials(url, name)
    except KeyError:  # not created yet
        return 0, 0
    pid = int(pid_file.read_text()) if pid_file.exists() else -1
    running = sum(1 for t in trials if t.state == TrialState.RUNNING and (t.user_attrs.get("owner") or {}).get("pid") == pid)
    return sum(1 for t in trials if t.state == TrialState.COMPLETE), running


def run_layout(pg: Any, layout: Layout, inputs: tuple[Path, Path], work: Path, *, scenario: str = "steady",
               timeout_s: float = 900.0) -> dict[str, Any]:
    """Run one scenario on a fresh database; return its figures and checks."""
    from optuna.trial import TrialState

    from step5.testing import stored_trials

    tag = f"{scenario}_{layout.job_sleep_s:g}s".replace(".", "_")
    folder = work / tag
    folder.mkdir(parents=True)
    url = pg.create_database(f"layout_{tag}")
    config, policy, env = _write_cluster(folder, layout)
    cmd = [sys.executable, "-m", "step5.testing.fake_search", "--job-sleep-s", str(layout.job_sleep_s),
           "--timings-out", str(folder / "timings-main.json"), "--",
           "--survivors", str(inputs[0].resolve()), "--lottery-data", str(inputs[1].resolve()),
           "--model-type", "neural_net", "--trials", str(layout.trials), "--k-folds", str(layout.k_folds),
           "--seed", "1", "--policy", str(policy), "--storage", url, "--study-name", "layout",
           "--cluster-config", str(config), "--output-dir", str(folder / "out"), "--log-level", "INFO"]
    killed: str | None = None
    victim_pid = -1
    start = time.time()
    with open(folder / "main.log", "w") as log:
        main = subprocess.Popen(cmd, env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            while main.poll() is None and time.monotonic() < deadline:
                victim = folder / "pids" / "rig-2.pid"
                if scenario == "kill" and killed is None:
                    complete_now, running = _progress(url, "layout", victim)
                    if complete_now >= layout.trials // 3 and running:  # mid-batch, as a crash would find it
                        victim_pid = int(victim.read_text())
                        os.kill(victim_pid, signal.SIGKILL)
                        killed = f"rig-2 (pid {victim_pid})"
                        logger.info("killed the helper of %s at %d complete trials, %d of its trials running",
                                    killed, complete_now, running)
                time.sleep(0.5)
            if main.poll() is None:
                raise TimeoutError(f"the main process ran past {timeout_s:g}s; see {folder / 'main.log'}")
        finally:
            if main.poll() is None:
                main.terminate()
                main.wait(30)
    wall_s = time.time() - start
    text = (folder / "main.log").read_text(errors="replace")

    files = sorted(folder.glob("timings-*.json"))
    timings = [read_json_file(p, "timings") for p in files]
    slots = [layout.main_gpus if p.name == "timings-main.json" else layout.rig_gpus for p in files]
    trials = stored_trials(url, "layout")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    params = {tuple(sorted(t.params.items())) for t in complete}
    tells = sum(len(tm["tell"]) for tm in timings)
    rigs = [f"rig-{i}" for i in range(1, layout.rigs + 1)]
    rocm_slots = ", ".join(f"ROCm-{i}" for i in range(layout.rig_gpus))
    checks = {
        "main_exit_0": main.returncode == 0,
        "exactly_n_complete": len(complete) == layout.trials,
        "none_running": not any(t.state == TrialState.RUNNING for t in trials),
        "no_configuration_twice": len(params) == len(complete),
        # The killed helper's last batch never reached its timings file; its trials were
        # failed by the others (a reclaim writes no tell of its own).
        "each_trial_told_once": tells == len(trials) if scenario == "steady" else tells <= len(trials),
        "rigs_found_their_amd_gpus": all(f"[{r}]" in text and f"run on {rocm_slots} via" in text for r in rigs),
        "every_helper_host_ended": all(re.search(rf"helpers: .*{r} (done|stopped)", text) for r in rigs),
    }
    if scenario == "kill":
        # The others fail the dead helper's unfinished trials (its pid is gone on this host)
        # and queue a re-run of each with the params it had: a helper killed while sampling
        # a batch leaves trials with only some of their params (the re-run samples the
        # rest) or none (nothing to re-run: its place goes to a fresh trial). A queued
        # re-run it had taken but not started stays WAITING for whoever asks next.
        lost = [t for t in trials if (t.user_attrs.get("owner") or {}).get("pid") == victim_pid
                and t.state != TrialState.COMPLETE]
        reruns = {t.system_attrs.get("failed_trial"): t for t in complete if "failed_trial" in t.system_attrs}
        # A re-run the study filled without: still queued (WAITING) when the last trial was
        # told, or taken in the study's last seconds (by the restarted helper, or asked ahead
        # for a next batch) and stopped unrun. The study ends with exactly N all the same;
        # the configuration stays queued or was not needed to reach it.
        stopped_reruns = {t.system_attrs.get("failed_trial") for t in trials if "failed_trial" in t.system_attrs and (
            t.state == TrialState.WAITING
            or (t.state == TrialState.FAIL
                and any(w in str(t.user_attrs.get("fail_reason", "")) for w in ("interrupted", "asked ahead"))))}

        def recovered(t: Any) -> bool:
            if t.state == TrialState.WAITING:
                return True
            key = t.system_attrs.get("failed_trial", t.number)
            return (t.state == TrialState.FAIL and "died" in str(t.user_attrs.get("fail_reason", ""))
                    and (not t.params or key in stopped_reruns
                         or (key in reruns and t.params.items() <= reruns[key].params.items())))

        checks["killed_helpers_trials_rerun"] = killed is not None and bool(lost) and all(map(recovered, lost))
        killed = (f"{killed}; its unfinished trials: "
                  + ", ".join(f"{t.number} {t.state.name} ({len(t.params)} params)" for t in lost))
        # The fleet's verdict on the rig: restart it (whether the restart came before the
        # study was full depends on the run's length; the row says).
        checks["killed_rig_sent_to_restart"] = bool(re.search(r"\[rig-2\] helper ended with \S+ \(failure 1 of 3\); "
                                                             r"restarting it", text))
        killed = f"{killed}, restarted: {'[rig-2] helper starting (start 2' in text}"
    rate, window, per_process, overheads = steady_rate(timings, slots, layout)
    last_tell = max((at for tm in timings for _, at in tm["tell"]), default=start)
    return {
        "scenario": scenario, "slots": layout.slots, "trials": layout.trials, "complete": len(complete),
        "failed": len(failed), "processes": len(timings), "wall_s": wall_s, "window_s": window[1] - window[0],
        "trials_per_s": rate, "per_process_trials_per_s": per_process,
        "overhead_s_per_trial": overheads,
        "end_to_end_trials_per_s": len(complete) / max(1e-9, last_tell - start),
        "ideal_trials_per_s": layout.ideal_trials_per_s, "job_sleep_s": layout.job_sleep_s, "k_folds": layout.k_folds,
        "efficiency": rate / layout.ideal_trials_per_s, "killed": killed, "checks": checks,
        "log": str(folder / "main.log"),
    }


def steady_rate(
    timings: list[dict[str, Any]], slots: list[int], layout: Layout,
) -> tuple[float, tuple[float, float], list[float], list[float]]:
    """The study's trial rate in the steady state, the window it was read in, and per
    process its rate and its seconds per trial spent outside training.

    The window runs from the moment every process has asked its first trial to the last
    ask of the study: after it no trial starts (the study is full or in flight) and what
    is left is the run's tail. A process runs cycles: it asks B trials, trains their folds
    on its ``slots`` (``ceil(B * K / slots)`` rounds of a fold each), tells them, asks
    again. Its rate is read over whole cycles, from its first ask in the window to its
    last: the trials it told in between over that span (counting trials told against the
    window's edges instead would swing by a batch). The study's rate is the sum. What a
    cycle takes beyond its training is the time its slots waited between batches, shown
    per trial: the process's own work per batch (ask, sample, tell, storage writes) that
    the helper thread did not hide.
    """
    first_asks = [tm["ask"][0][1] for tm in timings if tm["ask"]]
    if not first_asks:
        return 0.0, (0.0, 0.0), [], []
    window = (max(first_asks), max(at for tm in timings for _, at in tm["ask"]))
    rates, overheads = [], []
    for tm, n_slots in zip(timings, slots):
        asks = [at for _, at in tm["ask"] if window[0] <= at <= window[1]]
        if len(asks) < 2:
            rates.append(0.0)
            overheads.append(float("nan"))
            continue
        told, training = 0, 0.0
        for begin, end in zip(asks, asks[1:]):
            batch = sum(1 for _, at in tm["tell"] if begin < at <= end)
            told += batch
            training += -(-batch * layout.k_folds // n_slots) * layout.job_sleep_s
        span = asks[-1] - asks[0]
        rates.append(told / span)
        overheads.append((span - training) / max(1, told))
    return sum(rates), window, rates, overheads


def _overheads(row: dict[str, Any]) -> str:
    values = row["overhead_s_per_trial"]
    main = values[-1] if values else float("nan")  # timings-main.json sorts last
    return f"{main:.2f} / " + ", ".join(f"{v:.2f}" for v in values[:-1])


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = ["| scenario | slots | fold s x K | trials | complete | failed (re-run) | processes | wall s | "
             "steady trials/s | ideal | of ideal | end to end trials/s | slots' wait s per trial (main / rigs) | checks |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|"]
    for r in rows:
        ok = "all hold" if all(r["checks"].values()) else "FAILED: " + ", ".join(k for k, v in r["checks"].items() if not v)
        lines.append(f"| {r['scenario']} | {r['slots']} | {r['job_sleep_s']:g} x {r['k_folds']} | {r['trials']} | "
                     f"{r['complete']} | {r['failed']} | {r['processes']} | {r['wall_s']:.1f} | "
                     f"{r['trials_per_s']:.2f} | {r['ideal_trials_per_s']:.2f} | {r['efficiency']:.0%} | "
                     f"{r['end_to_end_trials_per_s']:.2f} | {_overheads(r)} | {ok} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster_layout", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=Layout.trials)
    parser.add_argument("--job-sleep-s", default=str(Layout.job_sleep_s),
                        help="seconds per fold; a comma-separated list runs each scenario at each, side by side")
    parser.add_argument("--k-folds", type=int, default=Layout.k_folds)
    parser.add_argument("--scenarios", default="steady,kill")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per scenario")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    layouts = [Layout(trials=args.trials, k_folds=args.k_folds, job_sleep_s=float(v))
               for v in args.job_sleep_s.split(",") if v.strip()]

    from step5.data.sample import write_sample
    from step5.testing.postgres import TemporaryPostgres

    rows = []
    with tempfile.TemporaryDirectory(prefix="step5-cluster-layout-") as tmp, TemporaryPostgres() as pg:
        work = Path(tmp)
        inputs = write_sample(work / "data", n_survivors=300, n_features=12, seed=3)
        for layout in layouts:
            for scenario in [s.strip() for s in args.scenarios.split(",") if s.strip()]:
                logger.info("scenario %s: %d slots, %d trials of %d folds x %.1fs ...", scenario, layout.slots,
                            layout.trials, layout.k_folds, layout.job_sleep_s)
                row = run_layout(pg, layout, inputs, work, scenario=scenario, timeout_s=args.timeout_s)
                logger.info("scenario %s: %.2f trials/s (%.0f%% of ideal), checks %s", scenario, row["trials_per_s"],
                            100 * row["efficiency"], row["checks"])
                rows.append(row)
    table = format_rows(rows)
    steady = [r for r in rows if r["scenario"] == "steady"]
    met = all(r["efficiency"] >= TARGET_EFFICIENCY for r in steady)
    print(table)
    for r in steady:
        print(f"steady trial rate: {r['trials_per_s']:.2f}/s = {r['efficiency']:.0%} of the ideal "
              f"{r['ideal_trials_per_s']:.2f}/s ({r['slots']} slots / ({r['k_folds']} folds x {r['job_sleep_s']:g}s)); "
              f"target >= {TARGET_EFFICIENCY:.0%}: {'met' if r['efficiency'] >= TARGET_EFFICIENCY else 'NOT met'}")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "cluster_layout.json", {"layouts": [asdict(x) for x in layouts], "rows": rows})
    (args.out / "cluster_layout.md").write_text(table + "\n")
    return 0 if met and all(all(r["checks"].values()) for r in rows) else 3


if __name__ == "__main__":
    sys.exit(main())
