"""Training progress: boosting rounds as they happen, with the latest evaluation metric.

Why this shape:
- A wide multiclass version (58 classes) trained for over ten minutes with nothing on screen.
  xgboost.dask trains on the workers; the client only waits. A training callback on every worker has
  rank 0 report each round (at most a few times a second) as a Dask worker event; the client
  subscribes to that topic and turns each event into `lifecycle.progress.stage_progress`. Nothing is
  polled, and the events cost one small message per report.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lifecycle.progress import stage_progress

TOPIC = "lifecycle-train-rounds"
REPORT_EVERY_S = 0.25


def round_reporter(total: int) -> Any:
    """A training callback that reports rounds from rank 0 as worker events (see the module doc)."""
    import xgboost as xgb

    class RoundReporter(xgb.callback.TrainingCallback):
        def __init__(self) -> None:
            super().__init__()
            self._last = 0.0

        def after_iteration(self, model: Any, epoch: int, evals_log: dict) -> bool:
            from xgboost import collective

            now = time.monotonic()
            if collective.get_rank() != 0 or (now - self._last < REPORT_EVERY_S and epoch + 1 < total):
                return False
            self._last = now
            note = ""
            for data, metrics in evals_log.items():
                for name, values in metrics.items():
                    note = f"{data} {name} {float(values[-1]):.4f}"
            try:
                from distributed import get_worker

                get_worker().log_event(TOPIC, {"round": epoch + 1, "total": total, "note": note})
            except ValueError:  # not on a Dask worker (a plain xgboost.train): nothing to report to
                pass
            return False

    return RoundReporter()


@contextmanager
def reported_rounds(client: Any, stage: str = "train") -> Iterator[None]:
    """While training: rounds reported by the workers' `round_reporter` become stage progress."""
    def on_event(event: Any) -> None:
        _, msg = event
        stage_progress(stage, int(msg["round"]), int(msg["total"]), unit="rounds", note=str(msg.get("note", "")))

    client.subscribe_topic(TOPIC, on_event)
    try:
        yield
    finally:
        client.unsubscribe_topic(TOPIC)
