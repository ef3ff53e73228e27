"""Training progress: rounds reported from the workers while xgboost.dask trains; with the CLI's stderr
filter, no tracker line on the console."""

from __future__ import annotations

import time

import numpy as np

from cli.console import filtered_stderr
from lifecycle import progress
from tasks import training


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, int, int, str, str]] = []

    def started(self, stage: str) -> None: ...

    def finished(self, stage: str, status: str, seconds: float) -> None: ...

    def advanced(self, stage: str, done: int, total: int, unit: str = "rows", note: str = "") -> None:
        self.events.append((stage, done, total, unit, note))


def test_rounds_reach_the_progress_observer_and_the_tracker_stays_off_the_console(local_compute, capfd):
    import dask.array as da

    rng = np.random.default_rng(1)
    X = rng.normal(size=(4000, 5)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.float32)
    params = {"objective": "binary:logistic", "tree_method": "hist", "max_depth": 3, "eval_metric": ["logloss"]}
    recorder = Recorder()
    restore = progress.set_observer(recorder)
    try:
        with filtered_stderr(), local_compute.get_client() as client, client.as_current():
            train = client.persist([da.from_array(X[:3000], chunks=1500), da.from_array(y[:3000], chunks=1500)])
            held = client.persist([da.from_array(X[3000:], chunks=500), da.from_array(y[3000:], chunks=500)])
            booster, _ = training.boost(client, tuple(train), tuple(held), params, 30)
            # Events are delivered through the client's event loop; the last one goes out with the last round.
            deadline = time.monotonic() + 10
            while (not recorder.events or recorder.events[-1][1] < 30) and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        restore()
    assert booster.num_boosted_rounds() == 30
    assert recorder.events, "no round was reported"
    stage, done, total, unit, note = recorder.events[-1]
    assert (stage, done, total, unit) == ("train", 30, 30, "rounds")
    assert note.startswith("holdout logloss ")
    rounds = [e[1] for e in recorder.events]
    assert rounds == sorted(rounds)
    out, err = capfd.readouterr()
    assert "got rank" not in out + err
