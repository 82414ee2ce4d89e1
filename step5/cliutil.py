"""What every Step 5 command line shares: how a usage error ends, and the argument types.

A usage error exits 64 (``EX_USAGE``) in every command, never argparse's 2: exit code 2
means "degenerate signal" to the WATCHER, and a typo must not look like one.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from step5.errors import UsageError

class UsageErrorParser(argparse.ArgumentParser):
    """argparse whose usage errors print the usage line and exit 64, or, built with
    ``exit_on_error=False``, raise :class:`~step5.errors.UsageError` (the one-shot trainer
    answers one with a JSON line)."""

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
        """Report a usage error found after parsing (a flag conflict) as argparse would; returns 64."""
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code


def int_at_least(lowest: int) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers >= ``lowest``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lowest}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def number(text: str) -> float:
    """An argparse ``type`` for any number."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def fraction(text: str) -> float:
    """An argparse ``type`` for a fraction strictly between 0 and 1 (a share held out)."""
    value = number(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction strictly between 0 and 1, got {value}")
    return value


def closed_fraction(text: str) -> float:
    """An argparse ``type`` for a fraction from 0 to 1, both included (a share allowed)."""
    value = number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {value}")
    return value


def non_empty_path(text: str) -> Path:
    """An argparse ``type`` for a file or folder: an empty value (say, an unset shell variable) is
    an error, not the working directory that ``Path("")`` would silently mean."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty value")
    return Path(text)


def add_log_level(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` (any case) for logging on stderr."""
    parser.add_argument("--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"), default="INFO",
                        help="logging level (stderr)")
