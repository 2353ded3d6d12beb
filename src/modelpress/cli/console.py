"""Terminal output shared by every command: the result console (stdout) and progress on stderr."""

from __future__ import annotations

import sys

__all__ = ["console", "stderr_console", "progress"]


def console():
    """Results go to stdout; piped output (logs, CI) gets a wide fixed width so tables are not cut to 80 columns."""
    from rich.console import Console

    return Console(stderr=False, highlight=False, width=None if sys.stdout.isatty() else 160)


def stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def progress():
    """A progress bar on stderr, shown only on a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True, disable=not sys.stderr.isatty(), console=stderr_console())
