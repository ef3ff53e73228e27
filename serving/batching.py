"""Micro-batching of concurrent requests through the text encoder.

Why: a model with text features spends almost all of a request in the sentence encoder, and the
encoder's cost per text falls steeply with the batch size (one text: ~10 ms of mostly fixed overhead;
64 texts: ~2 ms each on 2 cores). Encoding each request alone, as `mlflow models serve` does, caps
throughput at the single-text rate. Here requests queue; one worker takes *everything waiting* when
it becomes free, runs one encoder + booster call for all of it in a thread, and hands each request
its own rows back. No timer: under light load a request is served at once (batch of one); under
load, batches grow by themselves to what arrived while the previous batch ran.

One bad request (a non-numeric value) must not fail its batch-mates: a batch that raises is re-run
request by request, so only the bad one gets its 400.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool

from serving.model import ServingModel


@dataclass
class _Job:
    columns: Mapping[str, Sequence[Any]]
    rows: int
    probabilities: bool
    future: asyncio.Future = field(repr=False)


def merge_columns(jobs: Sequence[_Job], wanted: Sequence[str]) -> dict[str, list]:
    """The jobs' columns concatenated in job order (every job carries every wanted column)."""
    return {c: [v for job in jobs for v in job.columns[c]] for c in wanted}


class Batcher:
    """Runs `model.predict_columns` for queued requests in batches of at most `max_rows` rows."""

    def __init__(self, model: ServingModel, max_rows: int = 256) -> None:
        self.model = model
        self.max_rows = max_rows
        self.wanted = model.schema.input_columns
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        self.batches = 0  # for tests and /health: how many encoder batches ran
        self.requests = 0

    async def predict(self, columns: Mapping[str, Sequence[Any]], rows: int, probabilities: bool) -> list[dict]:
        """Queue one request's rows; returns its predictions (or raises its own error)."""
        if rows == 0:
            return []
        if self._queue is None:  # created lazily: the queue must belong to the serving event loop
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(columns, rows, probabilities, future))
        return await future

    def _take(self, first: _Job) -> list[_Job]:
        assert self._queue is not None
        jobs, rows = [first], first.rows
        while rows < self.max_rows and not self._queue.empty():
            job = self._queue.get_nowait()
            jobs.append(job)
            rows += job.rows
        return jobs

    def _predict_batch(self, jobs: list[_Job]) -> list[list[dict] | BaseException]:
        """Runs in a worker thread: one model call for all jobs, or one per job if that call fails."""
        try:
            merged = merge_columns(jobs, self.wanted)
            proba = any(job.probabilities for job in jobs)
            predictions = self.model.predict_columns(merged, sum(job.rows for job in jobs), proba)
        except Exception:  # noqa: BLE001 - find out which request it was
            if len(jobs) == 1:
                raise
            return self._isolate(jobs)
        results: list[list[dict] | BaseException] = []
        start = 0
        for job in jobs:
            part = predictions[start:start + job.rows]
            start += job.rows
            if proba and not job.probabilities:
                part = [{"prediction": p["prediction"]} for p in part]
            results.append(part)
        return results

    def _isolate(self, jobs: list[_Job]) -> list[list[dict] | BaseException]:
        """After a failed batch: the requests whose own values fail get their error, the others share
        one batch again (one bad request costs one extra encoder call, not one per request)."""
        errors: dict[int, BaseException] = {}
        for i, job in enumerate(jobs):
            try:
                self.model.check_columns(job.columns, job.rows)
            except Exception as exc:  # noqa: BLE001 - handed to that request alone
                errors[i] = exc
        good = [job for i, job in enumerate(jobs) if i not in errors]
        if not errors or not good:  # not a value problem (or all bad): each request on its own
            return [self._alone(job) for job in jobs]
        done = iter(self._predict_batch(good))
        return [errors[i] if i in errors else next(done) for i in range(len(jobs))]

    def _alone(self, job: _Job) -> list[dict] | BaseException:
        try:
            return self.model.predict_columns(job.columns, job.rows, job.probabilities)
        except Exception as exc:  # noqa: BLE001 - handed to that request alone
            return exc

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            jobs = self._take(await self._queue.get())
            self.batches += 1
            self.requests += len(jobs)
            try:
                results = await run_in_threadpool(self._predict_batch, jobs)
            except Exception as exc:  # noqa: BLE001 - a single job's own error
                results = [exc]
            for job, result in zip(jobs, results):
                if job.future.done():  # the client went away
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
