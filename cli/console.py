"""What every command shares: the consoles, the one-line failure, the process environment, and the
stage-progress display.

Kept in one module below the command modules so that `cli.app`, `cli.server` and `cli.models` import
it and never each other (no cycles).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "GIT_PYTHON_REFRESH": "quiet",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}

QUIET_ENV = {
    # Prefect and Dask log every step to the console; the CLI shows stage progress and one-line errors
    # instead. Full logs still reach the Prefect API (`prefect flow-run logs ID`); `-v` shows them here.
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",
    "DASK_LOGGING__DISTRIBUTED": "error",
    "TQDM_DISABLE": "1",  # library load bars; the CLI draws its own stage progress
    "MLFLOW_LOGGING_LEVEL": "ERROR",  # "Successfully registered model", pickling notes: the summary says it
    "LANCEDB_LOG": "error",  # LanceDB's Rust warnings ("no existing dataset … will be created", k-means notes)
}


def prepare_env(verbose: bool = False) -> None:
    """Offline model loading and quiet telemetry; values a user set explicitly win.

    Runs before Prefect is imported (its logging is configured at import time)."""
    for key, value in {**OFFLINE_ENV, **({} if verbose else QUIET_ENV)}.items():
        os.environ.setdefault(key, value)


def fail(exc: Exception) -> NoReturn:
    """One red line on stderr and exit code 1: how every error meant for people ends a command."""
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=1)


class RichObserver:
    """Shows each stage as it runs, with its time and whether it reused its record."""

    def __init__(self, status: Any) -> None:
        self.status = status
        self.current: str | None = None  # the stage running now: what a stop names

    def started(self, stage: str) -> None:
        self.current = stage
        self.status.update(f"[bold]{stage}[/] running…")

    def finished(self, stage: str, status: str, seconds: float) -> None:
        self.current = None
        colour = {"ran": "green", "cached": "cyan"}.get(status, "yellow")
        console.print(f"  [{colour}]✓[/] {stage:<9} {status:<8} {seconds:7.2f}s")

    def advanced(self, stage: str, done: int, total: int, unit: str = "rows", note: str = "") -> None:
        width = 30
        filled = int(width * done / total) if total else width
        bar = "█" * filled + "░" * (width - filled)
        self.status.update(f"[bold]{stage}[/] {bar} {done}/{total} {unit}" + (f"  {note}" if note else ""))


# Native lines that reach file descriptor 2 directly and tell a console user nothing: xgboost's collective
# tracker logs one "Task [xgboost.dask-N]:ADDR got rank N" per worker from a thread of its own, where
# xgboost's Python log callback is not registered (the registry is per thread), so no Python setting
# reaches it. They go to the `xgboost` logger instead.
NATIVE_NOISE = re.compile(rb"^\[\d\d:\d\d:\d\d\] Task \[xgboost\.dask-\d+\]:\S+ got rank \d+\s*$")


@contextmanager
def filtered_stderr(noise: re.Pattern[bytes] = NATIVE_NOISE) -> Iterator[None]:
    """File descriptor 2 through a pipe whose lines matching `noise` go to a logger, the rest to stderr.

    Works at the descriptor level because the noise comes from native threads (and from child
    processes, which inherit the descriptor). Python's `sys.stderr` keeps writing to fd 2, so rich's
    error console and tracebacks pass through unchanged, line by line.
    """
    log = logging.getLogger("xgboost")
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if noise.match(line):
                        log.info(line.decode(errors="replace"))
                    else:
                        os.write(original, line + b"\n")
            if pending:
                os.write(original, pending)

    reader = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    reader.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(original, 2)  # our end of the pipe closes here; children that still hold it keep it open
        reader.join(timeout=0.3)  # short: after a stop, ending children may hold the pipe a while longer
        if not reader.is_alive():
            os.close(original)
