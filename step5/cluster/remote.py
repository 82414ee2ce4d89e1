"""The command that starts a ``--search-only`` helper on another host, built once, quoted.

::

    ssh -T -o BatchMode=yes -o ConnectTimeout=10 ... -- user@host \\
        "sh -c 'echo step5-helper-connected && cd <script_path> && \\
               exec env STEP5_STDIN_LIFELINE=1 <python_env> meta_prediction_optimizer_anti_overfit.py \\
                    --survivors ... --trials N --storage URL --study-name NAME --search-only'"

* Every word that comes from the config file or the main process's flags is quoted with
  :func:`shlex.quote`, and the whole is handed to ``sh -c`` (itself quoted), so neither the
  remote login shell (bash, zsh, fish, csh alike) nor ``sh`` ever sees a value unquoted.
  Host and user names are checked before (:mod:`step5.cluster.nodes`) and follow ``--``,
  so none can pass for an ssh option.
* ssh never waits for a human or a dead host: ``BatchMode`` (no password or passphrase
  prompt), ``ConnectTimeout`` (an unreachable host fails in seconds), ``ServerAlive*``
  (a connection that dies mid-run ends ssh within a minute), ``StrictHostKeyChecking=
  accept-new`` (a host seen before must keep its key; a new one is recorded, not asked
  about).
* The first line on the helper's stdout, :data:`CONNECTED_MARKER`, says the remote shell
  ran: an ssh failure before it is "unreachable", one after it is the helper's.
* ``STEP5_STDIN_LIFELINE=1`` makes the helper stop (as on SIGTERM: its running trials are
  failed and re-run elsewhere) when its stdin closes, which is what the remote end sees
  when the main process stops it or dies (:func:`step5.lifeline.install_stdin_lifeline`).

What a helper is given (:func:`helper_arguments`): the flags that shape the study's data
and setup and how its trials train, from the main process's configuration, plus the
resolved ``--storage`` and ``--study-name`` and ``--search-only``. What belongs to each host
(its GPUs, workers, trials in flight, output folder) is its own.
"""
from __future__ import annotations

import shlex
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from step5.cluster.nodes import ClusterNode
from step5.lifeline import STDIN_LIFELINE_ENV

#: The pipeline's Step 5 entry script at the root of each host's checkout.
ENTRY_SCRIPT = "meta_prediction_optimizer_anti_overfit.py"
#: First line a helper's remote shell prints on stdout: the host was reached.
CONNECTED_MARKER = "step5-helper-connected"
SSH_CONNECT_TIMEOUT_S = 10

#: OptimizerConfig fields a helper is given by the main process, each as the flag of its
#: name (``k_folds``: ``--k-folds``); a true/false one as its on/off pair.
FORWARDED_FIELDS: tuple[str, ...] = (
    "survivors", "lottery_data", "model_type", "trials", "k_folds", "test_holdout", "seed", "target",
    "normalize_features", "use_leaky_relu", "dropout", "nn_max_epochs", "cv_repeats", "prng_type", "mod",
    "holdout_draws", "persistent_workers", "fuse_folds", "fuse_trials", "pruner", "parent_run_id", "log_level",
)
#: ... and those each host decides for itself, or that only the main process has.
HOST_FIELDS = frozenset({
    "output_dir", "gpus", "cpu_workers", "trials_in_flight",  # this host's devices and folders
    "study_name", "storage", "search_only", "policy_path",  # given separately below
    "compare_models", "rescore_partitions", "enable_diagnostics", "diagnostics_dir",  # the main's role
    "skip_registry", "command_line", "cluster_config",
})


def helper_arguments(config: Any, *, study_name: str, storage: str, policy_given: bool) -> list[str]:
    """The optimizer flags a ``--search-only`` helper of ``config``'s study runs with.

    Paths are passed as the main process was given them: a relative one is read relative
    to the helper host's checkout (``script_path``). ``--policy`` is passed only when the
    main process was given one; otherwise each helper finds its own, as any run does.
    """
    names = {f.name for f in fields(config)}
    unknown = names - HOST_FIELDS - set(FORWARDED_FIELDS)
    assert not unknown, f"classify OptimizerConfig fields {sorted(unknown)} in step5.cluster.remote"
    argv: list[str] = []
    for name in FORWARDED_FIELDS:
        value = getattr(config, name)
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif name == "fuse_trials":
            if value > 1:
                argv += [flag, str(value)]
        else:
            argv += [flag, str(value)]
    if policy_given and config.policy_path is not None:
        argv += ["--policy", str(config.policy_path)]
    return [*argv, "--storage", storage, "--study-name", study_name, "--search-only"]


def remote_command(node: ClusterNode, arguments: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """The command line the helper host's login shell runs: ``sh -c '<quoted script>'``."""
    assignments = [f"{name}={value}" for name, value in {STDIN_LIFELINE_ENV: "1", **(env or {})}.items()]
    script = " ".join([
        "echo", CONNECTED_MARKER, "&&",
        "cd", shlex.quote(node.script_path), "&&",
        "exec", "env", *map(shlex.quote, assignments),
        shlex.quote(node.python_env), shlex.quote(ENTRY_SCRIPT), *map(shlex.quote, arguments),
    ])
    return "sh -c " + shlex.quote(script)


def ssh_command(
    node: ClusterNode, command: str, *, ssh: str | Path = "ssh", connect_timeout_s: int = SSH_CONNECT_TIMEOUT_S,
) -> list[str]:
    """The local argv: ssh with options that never wait for a human or a dead host."""
    options = [
        "-T",
        "-o", "BatchMode=yes",
        "-o", f"ConnectTimeout={int(connect_timeout_s)}",
        "-o", "ServerAliveInterval=15",
        "-o", "ServerAliveCountMax=3",
        "-o", "StrictHostKeyChecking=accept-new",
        "-o", "LogLevel=ERROR",
    ]
    return [str(ssh), *options, "--", node.destination, command]
