"""Stage progress reporting without tying flows to a terminal.

Flows call `stage_started` / `stage_finished`; by default nothing happens. The CLI installs an
observer that drives a rich progress display, so the same flow code runs quietly under a worker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Observer(Protocol):
    def started(self, stage: str) -> None: ...

    def finished(self, stage: str, status: str, seconds: float) -> None: ...

    def advanced(self, stage: str, done: int, total: int, unit: str = "rows", note: str = "") -> None: ...


class _Null:
    def started(self, stage: str) -> None:
        return None

    def finished(self, stage: str, status: str, seconds: float) -> None:
        return None

    def advanced(self, stage: str, done: int, total: int, unit: str = "rows", note: str = "") -> None:
        return None


_observer: Observer = _Null()


def set_observer(observer: Observer | None) -> Callable[[], None]:
    """Install an observer; returns a function that restores the previous one."""
    global _observer
    previous, _observer = _observer, observer or _Null()

    def restore() -> None:
        global _observer
        _observer = previous

    return restore


def stage_started(stage: str) -> None:
    _observer.started(stage)


def stage_finished(stage: str, status: str, seconds: float) -> None:
    _observer.finished(stage, status, seconds)


def stage_progress(stage: str, done: int, total: int, unit: str = "rows", note: str = "") -> None:
    """Work done so far in a long stage (rows embedded, boosting rounds, …), with an optional note such
    as the latest metric; shown as a progress bar by the CLI."""
    _observer.advanced(stage, done, total, unit, note)
