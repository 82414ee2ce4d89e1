"""The pipeline's ``distributed_config.json``: which hosts a study can use, and how to reach them.

The pipeline lists every host of its cluster once, the coordinator included::

    {"nodes": [
      {"hostname": "localhost", "username": "michael", "gpu_count": 2, "gpu_type": "RTX 3080 Ti",
       "script_path": "/home/michael/distributed_prng_analysis",
       "python_env": "/home/michael/venvs/torch/bin/python"},
      {"hostname": "192.168.3.120", "username": "michael", "gpu_count": 8, "gpu_type": "RX 6600",
       "script_path": "/home/michael/distributed_prng_analysis",
       "python_env": "/home/michael/rocm_env/bin/python", ...}],
     "sieve_defaults": {...}, ...}

Step 5 reads ``nodes`` only (other sections and other keys of a node belong to other
steps). A node naming this host (``localhost``, ``127.0.0.1``, this host's name) is where
the main process already runs; every other node gets a ``--search-only`` helper
(:mod:`step5.cluster.fleet`). Every value here ends up in an ssh command line, so each is
checked: a host or user name that could pass for an ssh option (``-oProxyCommand=...``)
or holds spaces is refused, and the rest is quoted when the command is built
(:mod:`step5.cluster.remote`). A malformed file is a :class:`~step5.errors.DataError`
naming the file, the node and the key.
"""
from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from step5.errors import DataError
from step5.jsonio import read_json_file
from step5.values import is_int

#: Host names and addresses (IPv6 in brackets or bare) as ssh takes them; never starting with "-".
_HOST = re.compile(r"[A-Za-z0-9_.:\[\]%][A-Za-z0-9_.:\[\]%-]*")
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\$?")
#: Names that always mean the host this process runs on.
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "localhost.localdomain"})


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
    def destination(self) -> str:
        """``user@host`` (or ``host``) for ssh."""
        return f"{self.username}@{self.hostname}" if self.username else self.hostname


def _node(raw: Any, index: int, source: str) -> ClusterNode:
    where = f"{source}: nodes[{index}]"
    if not isinstance(raw, dict):
        raise DataError(f"{where} must be an object, got {type(raw).__name__}")

    def text(key: str, *, required: bool = True) -> str | None:
        value = raw.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}.{key} must be a non-empty string, got {value!r}")
        if any(ord(c) < 32 or c == "\x7f" for c in value):
            raise DataError(f"{where}.{key} holds a control character: {value!r}")
        return value

    hostname = text("hostname")
    assert hostname is not None
    if not _HOST.fullmatch(hostname):
        raise DataError(f"{where}.hostname {hostname!r} is not a host name or address ssh can take "
                        "(letters, digits, '.', ':', '-', not starting with '-')")
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
    assert script_path is not None
    if not script_path.startswith("/"):
        raise DataError(f"{where}.script_path must be an absolute path (the pipeline's checkout on "
                        f"{hostname}), got {script_path!r}")
    python_env = text("python_env")
    assert python_env is not None
    return ClusterNode(hostname, username, int(gpu_count), gpu_type, script_path, python_env)


def parse_cluster_config(raw: Any, source: str = "<distributed_config>") -> list[ClusterNode]:
    """The nodes of an already-parsed ``distributed_config.json``."""
    if not isinstance(raw, dict):
        raise DataError(f"{source}: must be a JSON object with a `nodes` array, got {type(raw).__name__}")
    nodes = raw.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise DataError(f"{source}: `nodes` must be a non-empty array of hosts, got {nodes!r:.80}")
    out = [_node(item, i, source) for i, item in enumerate(nodes)]
    seen: dict[str, int] = {}
    for i, node in enumerate(out):
        key = node.hostname.lower()
        if key in seen:
            raise DataError(f"{source}: nodes[{i}].hostname {node.hostname!r} is listed twice "
                            f"(also nodes[{seen[key]}]); one helper per host uses all of its GPUs")
        seen[key] = i
    return out


def load_cluster_config(path: str | Path) -> list[ClusterNode]:
    """Read and check the nodes of ``distributed_config.json``."""
    return parse_cluster_config(read_json_file(path, "cluster config"), str(path))


def local_names() -> frozenset[str]:
    """The names under which a node is this host: loopback, this host's names, and the
    addresses of its interfaces (a config may list the coordinator by its LAN address)."""
    import psutil

    names = set(LOOPBACK_NAMES)
    for name in (socket.gethostname(), socket.getfqdn()):
        if name:
            names.update({name.lower(), name.split(".")[0].lower()})
    try:
        for addresses in psutil.net_if_addrs().values():
            names.update(a.address.split("%")[0].lower() for a in addresses
                         if a.family in (socket.AF_INET, socket.AF_INET6))
    except OSError:
        pass
    return frozenset(names)


def split_local(nodes: Iterable[ClusterNode], names: Iterable[str] | None = None) -> tuple[list[ClusterNode], list[ClusterNode]]:
    """(nodes that are this host, the others): the main process runs here, helpers there."""
    here = {n.lower() for n in (local_names() if names is None else names)}
    local = [n for n in nodes if n.hostname.lower() in here]
    remote = [n for n in nodes if n.hostname.lower() not in here]
    return local, remote


def storage_is_loopback(url: str) -> bool:
    """Whether a storage URL's database host is this host's loopback (or a local socket),
    which a helper on another host would read as itself."""
    try:
        from sqlalchemy.engine import make_url

        host = make_url(url).host
    except Exception:  # noqa: BLE001 - an unparsable URL is reported when it is opened
        return False
    return host is None or host.lower() in LOOPBACK_NAMES
