"""What every Step 5 command line shares: how a usage error ends.

A usage error exits :attr:`~step5.errors.UsageError.exit_code` (64, like ``EX_USAGE``) in
every command, never argparse's 2: exit code 2 means "degenerate signal" to the WATCHER,
and a typo must not look like one.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn, Sequence

from step5.errors import UsageError


class UsageErrorParser(argparse.ArgumentParser):
    """argparse whose usage errors exit 64, or, built with ``exit_on_error=False``, raise
    :class:`~step5.errors.UsageError` (the one-shot trainer answers one with a JSON line).

    Either way the usage line goes to stderr first. :meth:`usage_error` reports a usage
    error found after parsing (a flag conflict) the same way.
    """

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        if not self.exit_on_error:
            raise UsageError(f"{self.prog}: {message}")
        self.exit(UsageError.exit_code, f"{self.prog}: error: {message}\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: Any = None,
    ) -> tuple[argparse.Namespace, list[str]]:
        try:
            return super().parse_known_args(args, namespace)
        except argparse.ArgumentError as exc:  # argparse lets these through when exit_on_error is off
            self.error(str(exc))

    def usage_error(self, exc: UsageError) -> int:
        """Print ``exc`` as argparse prints a usage error; returns the exit code (64)."""
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
