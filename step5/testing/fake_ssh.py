"""A stand-in ``ssh`` that runs the remote command on this host (``sh -c``, as sshd runs it),
for tests of the cluster fleet; its settings come from ``STEP5_FAKE_SSH_*`` (docs/workers.md
"The fakes"). Like ssh it exits with the remote command's status, 255 when that was killed
by a signal or the host cannot be reached; closing its stdin is what a remote command sees
when the connection closes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Sequence

UNREACHABLE_ENV = "STEP5_FAKE_SSH_UNREACHABLE"
LOG_ENV = "STEP5_FAKE_SSH_LOG"
REQUIRE_ENV = "STEP5_FAKE_SSH_REQUIRE"
HOST_ENV = "STEP5_FAKE_SSH_HOST"
#: ssh options that take a value (the rest of the single-letter options are flags).
_WITH_VALUE = set("BbcDEeFIiJLlmOoPpQRSWw")


def parse(argv: Sequence[str]) -> tuple[list[str], str, str]:
    """(the ``-o`` options, the destination, the command) of an ssh command line."""
    options: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        letter = arg[1:2]
        if letter in _WITH_VALUE:
            value = arg[2:] or (argv[i + 1] if i + 1 < len(argv) else "")
            if letter == "o":
                options.append(value)
            i += 1 if arg[2:] else 2
        else:
            i += 1
    if i >= len(argv):
        raise SystemExit("usage: ssh [options] destination command")
    return options, argv[i], " ".join(argv[i + 1:])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    options, destination, command = parse(argv)
    host = destination.rsplit("@", 1)[-1]
    log = os.environ.get(LOG_ENV)
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps({"argv": argv, "host": host, "options": options}) + "\n")
    missing = [o for o in os.environ.get(REQUIRE_ENV, "").split(",") if o and o not in options]
    if missing:
        print(f"fake ssh: missing required options {missing}", file=sys.stderr)
        return 255
    if host in os.environ.get(UNREACHABLE_ENV, "").split(","):
        time.sleep(0.2)
        print(f"ssh: connect to host {host} port 22: Connection timed out", file=sys.stderr)
        return 255
    # A session of its own, as sshd gives each command: hang_up can end all of it.
    proc = subprocess.Popen(["sh", "-c", command], env={**os.environ, HOST_ENV: host}, start_new_session=True)

    def hang_up(signum: int, frame: object) -> None:
        # A real ssh that is terminated drops the connection and the remote side tears the
        # session down. Here the "remote" command shares our stdin, so end its whole
        # process group instead: SIGTERM, and SIGKILL for whatever is left 2 s later.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(2.0)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, hang_up)
    signal.signal(signal.SIGINT, hang_up)
    returncode = proc.wait()
    return 255 if returncode < 0 else returncode


if __name__ == "__main__":
    sys.exit(main())
