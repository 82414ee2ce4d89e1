"""The pipeline's cluster: ``--search-only`` helpers on the other hosts of its
``distributed_config.json``, started over ssh by the main process, supervised and stopped.

docs/cluster.md ("How the fleet works") has the config's shape, the quoted ssh command,
what a helper is given and the supervision's state machine. The fleet never stops the
study: an unreachable host is named and skipped, a failing one quarantined, and the main
process searches on with whoever is left.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import shlex
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import IO, Any, Iterable, Mapping, Sequence

from step5.errors import DataError, Step5Error, UsageError
from step5.execution.process import close_pipes, describe_exit, reap_killed
from step5.jsonio import read_json_file
from step5.lifeline import STDIN_LIFELINE_ENV
from step5.values import is_int

logger = logging.getLogger("step5.cluster")

#: Host names and addresses (IPv6 in brackets or bare) as ssh takes them; never starting with "-",
#: so none can pass for an ssh option (``-oProxyCommand=...``).
_HOST = re.compile(r"[A-Za-z0-9_.:\[\]%][A-Za-z0-9_.:\[\]%-]*")
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\$?")
#: Names that always mean the host this process runs on.
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "localhost.localdomain"})
#: The pipeline's Step 5 entry script at the root of each host's checkout.
ENTRY_SCRIPT = "meta_prediction_optimizer_anti_overfit.py"
#: First line a helper's remote shell prints on stdout: an ssh failure before it is "unreachable".
CONNECTED_MARKER = "step5-helper-connected"
SSH_CONNECT_TIMEOUT_S = 10
#: A line of a helper's own log (step5.optimizer.cli's format: "2026-12-07 15:18:23,101 WARNING name: ...").
_LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")
#: ssh's own exit status for its errors (connection, authentication, host key); also what it
#: returns when the remote command was killed by a signal.
SSH_ERROR = 255
#: What the remote shell (or ``env``) exits with when it cannot run the helper's command: a wrong
#: ``python_env`` or ``script_path`` on that node, which the same command would hit again on every restart.
COMMAND_NOT_RUN = {126: "is not executable", 127: "was not found"}
#: How long a stopped helper gets to fail its running trials and close its workers.
STOP_GRACE_S = 30.0

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


@dataclass(frozen=True)
class ClusterNode:
    """One host of the pipeline's cluster."""

    hostname: str  # as ssh reaches it
    username: str | None  # ssh user; None: ssh's default
    gpu_count: int  # as the pipeline lists it (the helper finds its own GPUs; this is for the log)
    gpu_type: str  # "RX 6600", "RTX 3080 Ti"
    script_path: str  # the pipeline's checkout on that host: where the helper runs
    python_env: str  # that host's interpreter (a ROCm build of torch on the rigs)

    @property
    def destination(self) -> str:  # for ssh
        return f"{self.username}@{self.hostname}" if self.username else self.hostname


def _node(raw: Any, index: int, source: str) -> ClusterNode:
    where = f"{source}: nodes[{index}]"
    if not isinstance(raw, dict):
        raise DataError(f"{where} must be an object, got {type(raw).__name__}")

    def text(key: str, *, required: bool = True) -> Any:
        value = raw.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}.{key} must be a non-empty string, got {value!r}")
        if any(ord(c) < 32 or c == "\x7f" for c in value):
            raise DataError(f"{where}.{key} holds a control character: {value!r}")
        if value != value.strip():  # " /home/m/env/bin/python": the node looked for a file named so, and failed
            raise DataError(f"{where}.{key} {value!r} has whitespace at its start or end; remove it")
        return value

    hostname = text("hostname")
    if not _HOST.fullmatch(hostname):
        raise DataError(f"{where}.hostname {hostname!r} is not a host name or address ssh can take "
                        "(letters, digits, '.', ':', '-', not starting with '-')")
    if hostname.startswith("[") and hostname.endswith("]") and _address(hostname[1:-1]) is not None:
        # An IPv6 address in brackets, as URLs write it: ssh takes it bare ("Could not resolve
        # hostname [::1]" otherwise), and bare it is compared with this host's addresses.
        hostname = hostname[1:-1]
    username = text("username", required=False)
    if username is not None and not _USER.fullmatch(username):
        raise DataError(f"{where}.username {username!r} is not a user name ssh can take "
                        "(letters, digits, '.', '_', '-', not starting with '-')")
    gpu_count = raw.get("gpu_count", 0)
    if not is_int(gpu_count) or gpu_count < 0:
        raise DataError(f"{where}.gpu_count must be a non-negative int, got {gpu_count!r}")
    gpu_type = raw.get("gpu_type", "")
    if not isinstance(gpu_type, str):
        raise DataError(f"{where}.gpu_type must be a string, got {gpu_type!r}")
    script_path = text("script_path")
    if not script_path.startswith("/"):
        raise DataError(f"{where}.script_path must be an absolute path (the pipeline's checkout on "
                        f"{hostname}), got {script_path!r}")
    return ClusterNode(hostname, username, int(gpu_count), gpu_type, script_path, text("python_env"))


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as an IP address, or None for a host name."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def host_key(hostname: str) -> str:
    """What tells two hosts apart: an address in its one canonical form (``2001:DB8:0::5`` and
    ``2001:db8::5`` are one host), a name in lower case."""
    address = _address(hostname)
    return hostname.lower() if address is None else address.compressed


def parse_cluster_config(raw: Any, source: str = "<distributed_config>") -> list[ClusterNode]:
    """The nodes of an already-parsed ``distributed_config.json`` (other sections belong to other steps)."""
    if not isinstance(raw, dict):
        raise DataError(f"{source}: must be a JSON object with a `nodes` array, got {type(raw).__name__}")
    nodes = raw.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise DataError(f"{source}: `nodes` must be a non-empty array of hosts, got {nodes!r:.80}")
    out = [_node(item, i, source) for i, item in enumerate(nodes)]
    seen: dict[str, int] = {}
    for i, node in enumerate(out):
        key = host_key(node.hostname)
        if key in seen:
            raise DataError(f"{source}: nodes[{i}].hostname {node.hostname!r} is listed twice "
                            f"(also nodes[{seen[key]}]); one helper per host uses all of its GPUs")
        seen[key] = i
    return out


def load_cluster_config(path: str | Path) -> list[ClusterNode]:
    return parse_cluster_config(read_json_file(path, "cluster config"), str(path))


def local_names() -> frozenset[str]:
    """The names under which a node is this host: loopback, this host's names, and the
    addresses of its interfaces (a config may list the coordinator by its LAN address)."""
    import psutil

    names = set(LOOPBACK_NAMES)
    for name in (socket.gethostname(), socket.getfqdn()):
        if name:
            names.update({name.lower(), name.split(".")[0].lower()})
    with contextlib.suppress(OSError):
        for addresses in psutil.net_if_addrs().values():
            names.update(a.address.split("%")[0].lower() for a in addresses
                         if a.family in (socket.AF_INET, socket.AF_INET6))
    return frozenset(names)


def split_local(nodes: Iterable[ClusterNode],
                names: Iterable[str] | None = None) -> tuple[list[ClusterNode], list[ClusterNode]]:
    """(nodes that are this host, the others): the main process runs here, helpers there. Any
    loopback address (``127.0.1.1``, which Debian gives a host's own name) is this host too."""
    here = {host_key(n) for n in (local_names() if names is None else names)}

    def is_here(node: ClusterNode) -> bool:
        address = _address(node.hostname)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:127.0.0.1
        return host_key(node.hostname) in here or (address is not None and address.is_loopback)

    local = [n for n in nodes if is_here(n)]
    remote = [n for n in nodes if not is_here(n)]
    return local, remote


def storage_warnings(url: str) -> list[str]:
    """What a user should hear about ``url`` as the helpers on the other hosts will use it: a database on this
    host's loopback (or a local socket), which a helper would look for on itself; a password in the URL, which
    travels on each helper's ssh command line, where ``ps`` on the rig shows it."""
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - an unparsable URL is reported when it is opened
        return []
    shown = parsed.render_as_string(hide_password=True)
    warnings = []
    if parsed.host is None or parsed.host.lower() in LOOPBACK_NAMES:
        warnings.append(f"--storage {shown} names this host as the database; helpers on other hosts will look for "
                        "it on themselves (give the database host's address)")
    if parsed.password:
        warnings.append(f"--storage {shown} carries a password, which travels on each helper's ssh command line, "
                        "where ps on the rig shows it: put it in ~/.pgpass on every host and leave it out of the URL "
                        "(docs/cluster.md)")
    return warnings


def helper_arguments(config: Any, *, study_name: str, storage: str, policy_given: bool) -> list[str]:
    """The optimizer flags a ``--search-only`` helper of ``config``'s study runs with.

    Paths go as the main process was given them (a relative one is read relative to the
    helper host's checkout). ``--policy`` goes only when the main process was given one;
    otherwise each helper finds its own, as any run does.
    """
    unknown = {f.name for f in fields(config)} - HOST_FIELDS - set(FORWARDED_FIELDS)
    assert not unknown, f"classify OptimizerConfig fields {sorted(unknown)} in step5.cluster"

    def option(flag: str, value: Any) -> list[str]:
        # A value that starts with "-" (--survivors=-s.json, --study-name=-run7) as one word: on its
        # own argparse would take it for a flag, and every helper would refuse its command line.
        text = str(value)
        return [f"{flag}={text}"] if text.startswith("-") else [flag, text]

    argv: list[str] = []
    for name in FORWARDED_FIELDS:
        value = getattr(config, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif value is not None and (name != "fuse_trials" or value > 1):
            argv += option(flag, value)
    if policy_given and config.policy_path is not None:
        argv += option("--policy", config.policy_path)
    return [*argv, *option("--storage", storage), *option("--study-name", study_name), "--search-only"]


def remote_command(node: ClusterNode, arguments: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """``sh -c '<script>'`` for the helper host's login shell, every word quoted, so neither
    that shell (bash, zsh, fish, csh alike) nor ``sh`` sees a value unquoted. The lifeline
    variable makes the helper stop when its stdin (the ssh connection) closes. A ``script_path`` that
    is not there or holds no entry script exits 127, as a missing ``python_env`` does, so that the same
    mistake is not retried (sh reads ``a && b || c && d`` left to right: ``exit`` only when a step failed)."""
    assignments = [f"{name}={value}" for name, value in {STDIN_LIFELINE_ENV: "1", **(env or {})}.items()]
    script = " ".join([
        "echo", CONNECTED_MARKER, "&&",
        "cd", shlex.quote(node.script_path), "&&", "test", "-f", shlex.quote(ENTRY_SCRIPT), "||", "exit", "127", "&&",
        "exec", "env", *map(shlex.quote, assignments),
        shlex.quote(node.python_env), shlex.quote(ENTRY_SCRIPT), *map(shlex.quote, arguments),
    ])
    return "sh -c " + shlex.quote(script)


def ssh_command(
    node: ClusterNode, command: str, *, ssh: str | Path = "ssh", connect_timeout_s: int = SSH_CONNECT_TIMEOUT_S,
) -> list[str]:
    """The local argv: ssh with options that never wait for a human or a dead host."""
    options = ["BatchMode=yes", f"ConnectTimeout={int(connect_timeout_s)}", "ServerAliveInterval=15",
               "ServerAliveCountMax=3", "StrictHostKeyChecking=accept-new", "LogLevel=ERROR"]
    return [str(ssh), "-T", *(word for option in options for word in ("-o", option)), "--", node.destination, command]


class HelperAction(str, Enum):
    RESTART = "restart"  # start the helper again after a pause
    DONE = "done"  # the helper finished its work (the study is full)
    STOPPED = "stopped"  # the main process stopped it
    UNREACHABLE = "unreachable"  # the host never answered: skipped for this run
    QUARANTINED = "quarantined"  # it kept failing: left alone for this run


@dataclass
class HelperRecord:
    """One helper host across the run (pure logic: the state machine of docs/cluster.md);
    changed only by the thread that supervises it."""

    host: str
    max_failures: int = 3
    restart_delay_s: float = 5.0
    #: A helper that ran this long before it ended was healthy: the failures before it are forgiven, so a
    #: few lost connections spread over a long study do not add up to a quarantine.
    healthy_s: float = 600.0
    starts: int = 0
    failures: int = 0
    state: str = "pending"  # pending | running | waiting | done | stopped | unreachable | quarantined
    last_exit: str | None = None  # "EXIT(1)", "SIGKILL(-9)", ...
    reason: str = ""  # why it ended the way it did, for the log and the summary
    history: list[str] = field(default_factory=list)  # every end, in order

    def __post_init__(self) -> None:
        if self.max_failures < 1:
            raise ValueError(f"`max_failures` must be >= 1, got {self.max_failures!r}")
        if not self.restart_delay_s >= 0:
            raise ValueError(f"`restart_delay_s` must be >= 0, got {self.restart_delay_s!r}")

    def on_start(self) -> None:
        self.starts += 1
        self.state = "running"

    def on_exit(self, returncode: int | None, *, connected: bool, stopping: bool,
                ran_s: float = 0.0) -> tuple[HelperAction, float]:
        """The helper's ssh ended after ``ran_s`` seconds; ``connected``: the remote shell ran; ``stopping``:
        the main process asked it to stop. Returns the action and, for a restart, the pause (doubling)."""
        self.last_exit = describe_exit(returncode)
        self.history.append(self.last_exit)
        if stopping:
            return self._end(HelperAction.STOPPED, "stopped by the main process")
        if returncode == 0:
            return self._end(HelperAction.DONE, "the study is full")
        if returncode == SSH_ERROR and not connected and self.starts == 1:
            return self._end(HelperAction.UNREACHABLE, "ssh could not reach it")
        if returncode == UsageError.exit_code:  # the same command would fail the same way
            return self._end(HelperAction.QUARANTINED, "its helper refused the command line (usage error)")
        if returncode in COMMAND_NOT_RUN:
            return self._end(HelperAction.QUARANTINED, f"its command {COMMAND_NOT_RUN[returncode]} on the host "
                                                       "(check the node's python_env and script_path)")
        if ran_s >= self.healthy_s:
            self.failures = 0
        self.failures += 1
        if self.failures >= self.max_failures:
            return self._end(HelperAction.QUARANTINED, f"its helper failed {self.failures} time(s)")
        self.state = "waiting"
        self.reason = f"failure {self.failures} of {self.max_failures}"
        return HelperAction.RESTART, self.restart_delay_s * 2 ** (self.failures - 1)

    def _end(self, action: HelperAction, reason: str) -> tuple[HelperAction, float]:
        self.state = action.value
        self.reason = reason
        return action, 0.0


@dataclass
class _Helper:
    node: ClusterNode
    record: HelperRecord
    thread: threading.Thread | None = None
    proc: subprocess.Popen[bytes] | None = None  # the ssh client running now, if any
    connected: bool = False


class HelperFleet:
    """``--search-only`` helpers on ``nodes``, each running the optimizer with ``arguments``
    through the ``ssh`` on PATH (a :class:`Step5Error` when there is none), one supervisor
    thread per host; a context manager that stops them on exit. Without nodes it is the null
    fleet of a run without ``--cluster-config``. Each host's record is changed only by its
    supervisor; ``stop`` sets a flag and closes pipes, and the supervisors see their helpers end."""

    def __init__(self, nodes: Sequence[ClusterNode], arguments: Sequence[str], *, max_failures: int = 3,
                 restart_delay_s: float = 5.0, stop_grace_s: float = STOP_GRACE_S) -> None:
        ssh = shutil.which("ssh") if nodes else "ssh"
        if ssh is None:
            raise Step5Error("--cluster-config starts helpers over ssh, but there is no ssh client on PATH")
        self._ssh = ssh
        self._arguments = list(arguments)
        self.stop_grace_s = float(stop_grace_s)
        self._helpers = [_Helper(n, HelperRecord(n.hostname, max_failures, restart_delay_s)) for n in nodes]
        self._lock = threading.Lock()  # guards _stopping against a supervisor about to start ssh
        self._stopping = threading.Event()
        self._stopped = False

    def __enter__(self) -> "HelperFleet":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop("the main process is done" if exc[0] is None else "the main process stopped")

    @property
    def records(self) -> list[HelperRecord]:
        return [h.record for h in self._helpers]

    def start(self) -> None:
        for h in self._helpers:
            h.thread = threading.Thread(target=self._supervise, args=(h,), name=f"step5-helper-{h.node.hostname}",
                                        daemon=True)
            h.thread.start()

    def _launch(self, h: _Helper) -> subprocess.Popen[bytes] | None:
        """Start the host's ssh (None once the fleet is stopping)."""
        with self._lock:
            if self._stopping.is_set():
                return None
            h.connected = False
            h.record.on_start()
            command = ssh_command(h.node, remote_command(h.node, self._arguments), ssh=self._ssh)
            try:
                # A session of its own: Ctrl-C in the terminal reaches the main process, which
                # then stops the helpers in order instead of every ssh dying at once.
                h.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, start_new_session=True)
            except OSError as exc:
                logger.error("[%s] cannot start ssh: %s", h.node.hostname, exc)
                h.proc = None
            return h.proc

    def _supervise(self, h: _Helper) -> None:
        host, record = h.node.hostname, h.record
        while True:
            proc = self._launch(h)
            if proc is None:
                if record.state in ("pending", "running"):
                    record.state, record.reason = "stopped", "not started: the fleet was stopping"
                return
            logger.info("[%s] helper starting (start %d; %d x %s listed; ssh pid %d)", host, record.starts,
                        h.node.gpu_count, h.node.gpu_type or "?", proc.pid)
            readers = [threading.Thread(target=self._read, args=(h, proc.stdout, True), daemon=True),
                       threading.Thread(target=self._read, args=(h, proc.stderr, False), daemon=True)]
            for r in readers:
                r.start()
            started = time.monotonic()
            returncode = proc.wait()
            ran_s = time.monotonic() - started
            for reader in readers:
                reader.join(timeout=5.0)
            # All three pipes of the ended ssh (stop() may be closing its stdin at the same time),
            # or each restart would leave them to the garbage collector.
            close_pipes(proc, stdout_free=not readers[0].is_alive(), stderr_free=not readers[1].is_alive())
            action, delay = record.on_exit(returncode, connected=h.connected, stopping=self._stopping.is_set(),
                                           ran_s=ran_s)
            if action is HelperAction.RESTART:
                logger.warning("[%s] helper ended with %s (%s); restarting it in %.0fs", host, record.last_exit,
                               record.reason, delay)
            elif action is HelperAction.UNREACHABLE:
                logger.warning("[%s] unreachable: ssh ended with %s before the host answered; skipped for this "
                               "run (the study goes on without it)", host, record.last_exit)
            elif action is HelperAction.QUARANTINED:
                logger.warning("[%s] quarantined: %s (last: %s); the study goes on without it", host, record.reason,
                               record.last_exit)
            else:
                logger.info("[%s] helper finished with %s: %s", host, record.last_exit, record.reason)
            if action is not HelperAction.RESTART:
                return
            if self._stopping.wait(delay):
                record.state, record.reason = "stopped", "stopped while waiting to restart"
                return

    def _read(self, h: _Helper, stream: IO[bytes] | None, stdout: bool) -> None:
        """Log every line as ``[host] ...``; on stdout, the first :data:`CONNECTED_MARKER` is taken.
        A line of the helper's log keeps its level; any other stderr line (ssh's or the shell's error,
        the helper's one-line ``error: ...``, a traceback) is a warning: a main process run with
        ``--log-level WARNING`` must still say why a helper failed. Once the main process stops the
        helpers, their lines are INFO: "terminated by SIGTERM" is then the end it asked for."""
        assert stream is not None
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip()
            if stdout and not h.connected and line == CONNECTED_MARKER:
                h.connected = True
            elif line:
                record = _LOG_LINE.match(line)
                level = logging.INFO if stdout else logging.WARNING
                if record:
                    level = logging.getLevelName(record.group(1))
                if self._stopping.is_set():
                    level = min(level, logging.INFO)
                logger.log(level, "[%s] %s", h.node.hostname, line)

    def stop(self, why: str = "the main process is done") -> None:
        """Stop every helper still running and wait for the supervisors; idempotent. Each
        helper's stdin is closed (it stops as on SIGTERM: its running trials are failed and
        re-run); after ``stop_grace_s`` its ssh client is terminated, then killed."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._stopping.set()
            running = [h for h in self._helpers if h.proc is not None and h.proc.poll() is None]
        if not self._helpers:
            return
        if running:
            logger.info("stopping %d helper(s) (%s): %s", len(running), why,
                        ", ".join(h.node.hostname for h in running))
        for h in running:
            assert h.proc is not None and h.proc.stdin is not None
            with contextlib.suppress(OSError):
                h.proc.stdin.close()
        deadline = time.monotonic() + self.stop_grace_s
        for h in running:
            assert h.proc is not None
            try:
                h.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                continue
            except subprocess.TimeoutExpired:
                logger.warning("[%s] helper did not stop in time; ending its ssh connection", h.node.hostname)
            h.proc.terminate()
            try:
                h.proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                h.proc.kill()
                reap_killed(h.proc, f"[{h.node.hostname}] ssh client")
        for h in self._helpers:
            if h.thread is not None:
                h.thread.join(timeout=10.0)
        logger.info("helpers: %s", "; ".join(f"{r.host} {r.state} ({r.reason}, {r.starts} start(s))"
                                            for r in self.records))
