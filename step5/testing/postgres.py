"""A throwaway PostgreSQL server on loopback, for the shared-study tests and the cluster
simulation (docs/workers.md "The fakes": where its tools come from, root, orphans)::

    with TemporaryPostgres() as pg:
        url = pg.create_database("study")  # postgresql+psycopg://step5@127.0.0.1:PORT/study
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from step5.owner import claim_folder, orphaned_folders

SERVER_USER = "postgres"  # who runs the server when we are root
FOLDER_PREFIX = "step5-pg-"
DB_USER = "step5"  # the superuser initdb creates; loopback connections are trusted
START_TIMEOUT_S = 60


class PostgresUnavailable(RuntimeError):
    """Raised when no PostgreSQL server can be started here (no initdb, or it failed)."""


def find_pg_bin() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``, or None."""
    candidates = [os.environ.get("STEP5_PG_BIN", "")]
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).parent))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for folder in candidates:
        if folder and (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TemporaryPostgres:
    """Start a PostgreSQL server on 127.0.0.1 and a free port; :meth:`stop` removes it all."""

    def __init__(self, *, max_connections: int = 300) -> None:
        self.max_connections = max_connections
        self.bin = find_pg_bin()
        self.root: Path | None = None
        self.port = 0
        self._running = False

    def _command(self, *args: str) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", SERVER_USER, "--", *args]
        return list(args)

    def start(self) -> "TemporaryPostgres":
        if self.bin is None:
            raise PostgresUnavailable("initdb/pg_ctl not found (PATH, $STEP5_PG_BIN, /usr/lib/postgresql/*/bin)")
        self.stop_orphaned()
        self.root = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX, dir="/tmp"))
        claim_folder(self.root)
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise PostgresUnavailable(
                    f"running as root and there is no {SERVER_USER!r} user to run the server") from None
            os.chown(self.root, user.pw_uid, user.pw_gid)
        initdb = [str(self.bin / "initdb"), "-D", str(self.root / "data"), "-U", DB_USER, "--auth=trust", "-E",
                  "UTF8", "--no-sync", "--no-instructions"]
        self._run(self._command(*initdb))
        for _ in range(3):  # a port taken between probing and binding: try another
            self.port = _free_port()
            try:
                self.start_server()
            except PostgresUnavailable:
                continue
            self._running = True
            return self
        self.stop()
        raise PostgresUnavailable(f"pg_ctl could not start a server; see {self.root / 'server.log'}")

    def _run(self, command: list[str]) -> None:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT_S)
        if proc.returncode != 0:
            log = ""
            if self.root is not None and (self.root / "server.log").exists():
                log = (self.root / "server.log").read_text(errors="replace")[-2000:]
            raise PostgresUnavailable(f"{' '.join(command[-2:])} exited {proc.returncode}: "
                                      f"{proc.stderr.strip() or proc.stdout.strip()}\n{log}")

    def ctl_command(self, action: str, data: Path | None = None, mode: str = "fast") -> list[str]:
        """The command line of ``pg_ctl`` ``action`` (``start``, ``stop``, ``restart``, ``status``)
        for this server (or the one of folder ``data``): a ``mode`` shutdown (fast: open
        connections are cut, as by an upgrade or a failover), waiting until done, the server's
        output to its log (never to the caller's pipes). The database fault tests hand it to
        the optimizer they disturb."""
        assert self.bin is not None and (data or self.root) is not None, "the server was never started"
        data = data or self.root / "data"  # type: ignore[operator]
        args = [str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(data.parent / "server.log"), "-w",
                "-t", str(START_TIMEOUT_S)]
        if action in ("stop", "restart"):
            args += ["-m", mode]
        if action in ("start", "restart"):
            args += ["-o", f"-p {self.port} -k {data.parent} -c listen_addresses=127.0.0.1 -c fsync=off "
                           f"-c synchronous_commit=off -c full_page_writes=off -c max_connections={self.max_connections}"]
        return self._command(*args, action)

    def start_server(self) -> None:
        """Start the server (again), on the same port and data folder."""
        self._run(self.ctl_command("start"))

    def is_running(self) -> bool:
        """Whether the server answers ``pg_ctl status`` (a fault test may have left it stopped)."""
        if self.bin is None or self.root is None:
            return False
        return subprocess.run(self.ctl_command("status"), capture_output=True, timeout=START_TIMEOUT_S).returncode == 0

    def _dsn(self, database: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={DB_USER} dbname={database}"

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Return once the server takes connections (a background restart may still be under way)."""
        import psycopg

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                psycopg.connect(self._dsn(), connect_timeout=5).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise PostgresUnavailable(f"the server on port {self.port} takes no connections") from None
                time.sleep(0.1)

    def sql_command(self, database: str, sql: str) -> list[str]:
        """The command line that runs ``sql`` on ``database`` as the superuser (no ``psql``:
        this Python and psycopg)."""
        code = "import sys, psycopg; psycopg.connect(sys.argv[1], autocommit=True).execute(sys.argv[2])"
        return [sys.executable, "-c", code, self._dsn(database), sql]

    def _stop_server(self, data: Path) -> None:
        if self.bin is not None:
            subprocess.run(self.ctl_command("stop", data, "immediate"), capture_output=True, timeout=START_TIMEOUT_S)

    def stop_orphaned(self) -> list[Path]:
        """Stop the servers of folders whose owner died on this host and remove those folders; returns them."""
        stopped = []
        for folder, _owner in orphaned_folders(Path("/tmp"), FOLDER_PREFIX):
            if (folder / "data" / "postmaster.pid").exists():
                self._stop_server(folder / "data")
            shutil.rmtree(folder, ignore_errors=True)
            stopped.append(folder)
        return stopped

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(self._dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://{DB_USER}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        """Stop the server (immediate: nothing needs saving) and remove its folder."""
        if self._running and self.bin is not None and self.root is not None:
            self._stop_server(self.root / "data")
            self._running = False
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> "TemporaryPostgres":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
