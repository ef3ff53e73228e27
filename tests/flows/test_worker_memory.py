"""The worker-memory watch against a scripted scheduler: which failures become the one line, and a pause
that restarts cannot end is interrupted (the real cluster case is in tests/flows/test_train_faults.py)."""

from __future__ import annotations

import time

import pytest

import tasks.worker_memory as worker_memory
from lifecycle.errors import LifecycleError
from tasks.worker_memory import WorkerMemoryError, memory_line, watch_worker_memory

MiB = 2**20


class FakeClient:
    """What the watch asks of a `distributed.Client`: the scheduler's address, events and workers."""

    def __init__(self, status: str = "running") -> None:
        self.scheduler = type("S", (), {"address": "tcp://127.0.0.1:1"})()
        self.events: list[tuple[float, dict]] = []
        self.status = status
        self.restarted: list[str] = []

    def get_events(self, topic: str):
        assert topic == worker_memory.RESTART_EVENT
        return tuple(self.events)

    def scheduler_info(self, n_workers: int = 5) -> dict:
        return {"workers": {"tcp://127.0.0.1:2": {"status": self.status, "memory_limit": 300 * MiB}}}

    def restart_workers(self, workers: list[str], raise_for_error: bool = True) -> dict:
        self.restarted += workers
        return dict.fromkeys(workers, "OK")

    def nanny_restarted(self) -> None:
        self.events.append((time.time(), {"worker": "tcp://127.0.0.1:2", "pid": len(self.events), "rss": 290 * MiB}))


class KilledWorker(Exception):
    """Stands in for distributed.scheduler.KilledWorker."""


def test_the_line_names_the_limit_and_the_restarts():
    assert memory_line("train", [300 * MiB, 300 * MiB], 2, 1, 30) == (
        "a Dask worker exceeded its memory limit (300 MiB per worker, DaskCompute.memory_limit) and was restarted "
        "3 times during train (2 past its limit, 1 paused for over 30 s); raise memory_limit or use fewer, larger "
        "workers")


def test_a_failure_after_memory_restarts_becomes_the_line_and_others_pass_unchanged():
    client = FakeClient()
    client.nanny_restarted()  # before the block: not this stage's
    with pytest.raises(WorkerMemoryError, match=r"restarted 1 time during train \(1 past its limit\)"):
        with watch_worker_memory(client, "train"):
            client.nanny_restarted()
            raise KilledWorker("all those workers died")
    with pytest.raises(KilledWorker):  # no memory restart in the block: not about memory
        with watch_worker_memory(client, "train"):
            raise KilledWorker("all those workers died")
    with pytest.raises(LifecycleError, match="^the holdout side") as err:  # the stage's own line stands
        with watch_worker_memory(client, "train"):
            client.nanny_restarted()
            raise LifecycleError("the holdout side of the split is empty")
    assert not isinstance(err.value, WorkerMemoryError)

    class WorkerLost(LifecycleError):
        transient = True

    with pytest.raises(WorkerMemoryError):  # a lost worker (transient) after memory restarts: the line
        with watch_worker_memory(client, "train"):
            client.nanny_restarted()
            raise WorkerLost("training worker tcp://127.0.0.1:2 left the cluster while training 20 rounds")
    with pytest.raises(KeyboardInterrupt):
        with watch_worker_memory(client, "train"):
            client.nanny_restarted()
            raise KeyboardInterrupt


def test_a_pause_restarts_cannot_end_is_restarted_then_interrupted(monkeypatch):
    import dask
    import distributed  # noqa: F401 - its config defaults first: leaving `dask.config.set` restores what was before

    monkeypatch.setattr(worker_memory, "POLL_S", 0.05)
    client = FakeClient(status="paused")  # paused for ever, whatever is restarted
    started = time.monotonic()
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with pytest.raises(WorkerMemoryError, match=r"restarted 2 times during train \(2 paused for over 0 s\)"):
            with watch_worker_memory(client, "train", paused_limit_s=0.2):
                while time.monotonic() - started < 20:  # a stage waiting on its workers
                    time.sleep(0.05)
                pytest.fail("the waiting stage was never interrupted")
    assert client.restarted == ["tcp://127.0.0.1:2"] * 2  # allowed-failures + 1, then the interrupt
    assert time.monotonic() - started < 5


def test_a_nested_watch_on_the_same_scheduler_adds_nothing():
    client = FakeClient()
    with pytest.raises(WorkerMemoryError):
        with watch_worker_memory(client, "train"):
            with watch_worker_memory(client, "fit"):
                client.nanny_restarted()
                raise KilledWorker("all those workers died")
