"""`plait.cli:main`: parse the command line, run the command, and turn an
error into one line on stderr and an exit code."""

from __future__ import annotations

import sys
import warnings

from plait import PlaitError

from .common import UsageError
from .parser import build_parser


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """Warnings are messages to the user, not pointers into plait's source."""
    return f"plait: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what the ranks of `plait run --nproc` are started with
    if not args.debug:
        warnings.formatwarning = _warning_line
    try:
        return args.func(args)
    except (PlaitError, OSError) as exc:  # OSError: a file named on the command line
        if args.debug:
            raise
        print(f"plait: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except Exception as exc:  # a bug in plait (or a library) that no check caught
        if args.debug:
            raise
        from plait.runtime.launch import collective_failure

        failed = collective_failure(exc)  # a rank whose peer failed or went silent
        if failed is not None:
            print(f"plait: error: {failed}", file=sys.stderr)
            return 1
        print(
            f"plait: internal error: {type(exc).__name__}: {exc} (rerun with --debug for "
            "the traceback)",
            file=sys.stderr,
        )
        return 1
