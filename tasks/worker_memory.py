"""Worker memory pressure ends a stage in completion or in one line naming the memory limit, never a hang.

What Dask does when a worker nears its memory limit (`DaskCompute.memory_limit`), and what this adds:
- past `distributed.worker.memory.spill` it spills to disk, past `pause` it stops starting tasks, past
  `terminate` its nanny restarts it (logging a `worker-restart-memory` event on the scheduler); a task
  whose workers died `distributed.scheduler.allowed-failures` + 1 times fails with `KilledWorker`, whose
  text ("all those workers died") does not say why. `watch_worker_memory` reads those events and turns
  the failure into one line naming the limit.
- a pause ends only when the worker's memory falls below the threshold. When what holds it is not
  spillable (seen here with training on 300 MiB workers: both workers paused at ~90 % for minutes, the
  stage waiting on them for ever), nothing falls. A worker paused for `PAUSED_LIMIT_S` is therefore
  restarted through its nanny, the remedy Dask itself applies at `terminate`: its tasks run again
  elsewhere or on the fresh worker, and the same `allowed-failures` bound ends a stage that keeps
  running out of memory.
- should the stage still be waiting once more workers were restarted than that bound needs (seen: the
  restarted workers held none of the stage's running tasks, so no task counted a failure), the waiting
  thread is interrupted (`_Watcher._restart_or_interrupt`; the client's blocking calls wake every 10 s)
  and the stage ends with the same line.
- exceptions that are stops (`cli.stopping.Stopped`, KeyboardInterrupt) and the stage's own one-line
  `LifecycleError`s pass through unchanged; a transient one (the training worker was lost,
  `tasks.train_layout.WorkerLostError`) becomes the memory line when workers were restarted for memory.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from lifecycle.errors import LifecycleError

PAUSED_LIMIT_S = 30.0  # a pause longer than this is not going to end by spilling
POLL_S = 1.0
REPEAT_S = 15.0
RESTART_EVENT = "worker-restart-memory"  # what a nanny logs when it restarts a worker past `terminate`

_log = logging.getLogger("lifecycle.compute")
_WATCHED: set[str] = set()  # schedulers a guard is watching now (a nested guard adds nothing)
_WATCHED_LOCK = threading.Lock()


class WorkerMemoryError(LifecycleError):
    """A stage's Dask workers ran out of memory (restarted, or paused with no way out)."""


class _StillPaused(Exception):
    """Raised in the waiting thread when restarts did not end a pause (see `_interrupt`)."""


def _size(n: int) -> str:
    from dask.utils import format_bytes

    return format_bytes(n).replace(".00 ", " ")


def memory_line(stage: str, limits: list[int], terminated: int, paused: int, paused_limit_s: float) -> str:
    """The one line a stage fails with (pure)."""
    limit = f"{_size(min(limits))} per worker" if limits and min(limits) == max(limits) else (
        f"{_size(min(limits))}-{_size(max(limits))} per worker" if limits else "unknown")
    why = [f"{terminated} past its limit"] if terminated else []
    why += [f"{paused} paused for over {paused_limit_s:.0f} s"] if paused else []
    times = terminated + paused
    return (f"a Dask worker exceeded its memory limit ({limit}, DaskCompute.memory_limit) and was restarted "
            f"{times} time{'s' if times != 1 else ''} during {stage} ({', '.join(why)}); raise memory_limit or "
            "use fewer, larger workers")


class _Watcher:
    """Polls the scheduler: counts the nannies' memory restarts and restarts workers paused too long."""

    def __init__(self, client: Any, stage: str, paused_limit_s: float) -> None:
        import dask
        import distributed  # noqa: F401 - loads its config defaults (allowed-failures)

        self.client, self.stage, self.paused_limit_s = client, stage, paused_limit_s
        self.allowed = int(dask.config.get("distributed.scheduler.allowed-failures"))
        self.seen = {_event_id(e) for e in self._events()}
        self.limits: dict[str, int] = {}
        self.terminated, self.paused = 0, 0
        self.waiting = threading.get_ident()
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.interrupted_at: float | None = None
        self.since: dict[str, float] = {}
        self.thread = threading.Thread(target=self._run, name="worker-memory", daemon=True)

    def _events(self) -> list[Any]:
        return list(self.client.get_events(RESTART_EVENT) or ())

    def _run(self) -> None:
        while not self.done.wait(POLL_S):
            try:
                self._poll()
            except Exception as exc:  # noqa: BLE001 - a closing client/cluster: the stage itself will say
                _log.debug("worker memory watch: %s", exc)

    def _poll(self) -> None:
        new = [e for e in self._events() if _event_id(e) not in self.seen]
        for event in new:
            self.seen.add(_event_id(event))
            self.terminated += 1
            _log.warning("%s: Dask worker %s passed its memory limit (%s used); its nanny restarted it",
                         self.stage, event[1].get("worker"), _size(int(event[1].get("rss", 0))))
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        now = time.monotonic()
        for address, info in workers.items():
            if info.get("memory_limit"):
                self.limits[address] = int(info["memory_limit"])
            if info.get("status") != "paused":
                self.since.pop(address, None)
            elif now - self.since.setdefault(address, now) >= self.paused_limit_s:
                self._restart_or_interrupt(address)

    def _restart_or_interrupt(self, address: str) -> None:
        """A worker paused too long: restarted, while restarts may still end the stage the usual way
        (`KilledWorker` after `allowed-failures`); past that, the waiting thread is interrupted (again
        every `REPEAT_S`, should something on its way out have swallowed the first interrupt)."""
        if self.terminated + self.paused <= self.allowed + 1:
            self.since.pop(address)
            self.paused += 1
            _log.warning("%s: Dask worker %s paused at its memory limit for %.0f s: restarting it", self.stage,
                         address, self.paused_limit_s)
            self.client.restart_workers([address], raise_for_error=False)
            return
        with self.lock:
            now = time.monotonic()
            if self.done.is_set() or (self.interrupted_at is not None and now - self.interrupted_at < REPEAT_S):
                return
            self.interrupted_at = now
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.waiting), ctypes.py_object(_StillPaused))

    def stop(self) -> None:
        """In the waiting thread, as the block ends: no interrupt after this (a pending one is withdrawn).
        The thread is not waited for long: a stop signal's path out must not wait on a scheduler call."""
        with self.lock:
            self.done.set()
            if self.interrupted_at is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.waiting), None)
        self.thread.join(timeout=POLL_S)

    def count_late_restarts(self) -> None:
        """The nannies' restarts logged since the last poll (the block failed: the count is for its line)."""
        try:
            self.terminated += sum(1 for e in self._events() if _event_id(e) not in self.seen)
        except Exception:  # noqa: BLE001 - best effort
            pass

    def line(self) -> str:
        return memory_line(self.stage, list(self.limits.values()), self.terminated, self.paused, self.paused_limit_s)


def _event_id(event: Any) -> tuple[Any, ...]:
    stamp, body = event
    return (stamp, body.get("worker"), body.get("pid")) if isinstance(body, dict) else (stamp, str(body))


@contextmanager
def watch_worker_memory(client: Any, stage: str, paused_limit_s: float | None = None) -> Iterator[None]:
    """Watch the workers of `client`'s cluster while the block runs `stage`'s work on them.

    A worker paused for `paused_limit_s` (default `PAUSED_LIMIT_S`) is restarted. If the block fails
    after any worker was restarted for memory (by its nanny or here), the failure becomes one line.

    Raises:
        WorkerMemoryError: the block failed (`KilledWorker`, or the lost workers' own errors) after
            memory restarts, or it was still waiting on paused workers once restarts could not help.
    """
    address = str(client.scheduler.address)
    with _WATCHED_LOCK:
        nested = address in _WATCHED
        _WATCHED.add(address)
    if nested:
        yield
        return
    watcher = _Watcher(client, stage, PAUSED_LIMIT_S if paused_limit_s is None else paused_limit_s)
    watcher.limits = {a: int(w.get("memory_limit") or 0) for a, w in
                      client.scheduler_info(n_workers=-1)["workers"].items() if w.get("memory_limit")}
    watcher.thread.start()
    try:
        try:
            yield
        finally:
            watcher.stop()
    except _StillPaused:
        raise WorkerMemoryError(watcher.line()) from None
    except Exception as exc:
        if isinstance(exc, LifecycleError) and not getattr(exc, "transient", False):
            raise  # the stage's own one-line failure stands (a lost worker, transient, may be ours)
        watcher.count_late_restarts()
        if watcher.terminated + watcher.paused:
            raise WorkerMemoryError(watcher.line()) from exc
        raise
    finally:
        watcher.done.set()  # also when the interrupt landed inside `stop` itself
        with _WATCHED_LOCK:
            _WATCHED.discard(address)
    if watcher.terminated + watcher.paused:
        _log.warning("%s finished after %d Dask worker restart(s) for memory; a larger memory_limit avoids them",
                     stage, watcher.terminated + watcher.paused)


@contextmanager
def compute_memory_watched(compute: Any, stage: str, paused_limit_s: float | None = None) -> Iterator[None]:
    """`watch_worker_memory` on the cluster of a `DaskCompute` block (its own client; started clusters are
    shared with the stage's work, `DaskCompute.get_client`). A scheduler it cannot reach is left to the
    stage's own call, which says so in its line (and whose retries apply)."""
    with ExitStack() as stack:
        try:
            client = stack.enter_context(compute.get_client(check=False))
        except LifecycleError:
            client = None
        if client is None:
            yield
            return
        with watch_worker_memory(client, stage, paused_limit_s):
            yield
