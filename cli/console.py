"""What every command shares: the consoles, the one-line failure, the process environment, and the
stage-progress display.

Kept in one module below the command modules so that `cli.app`, `cli.server` and `cli.models` import
it and never each other (no cycles).
"""

from __future__ import annotations

import os
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

    def started(self, stage: str) -> None:
        self.status.update(f"[bold]{stage}[/] running…")

    def finished(self, stage: str, status: str, seconds: float) -> None:
        colour = {"ran": "green", "cached": "cyan"}.get(status, "yellow")
        console.print(f"  [{colour}]✓[/] {stage:<9} {status:<8} {seconds:7.2f}s")

    def advanced(self, stage: str, done: int, total: int) -> None:
        width = 30
        filled = int(width * done / total) if total else width
        bar = "█" * filled + "░" * (width - filled)
        self.status.update(f"[bold]{stage}[/] {bar} {done}/{total} rows")
