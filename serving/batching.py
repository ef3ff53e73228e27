"""Micro-batching of concurrent requests through the text encoder.

Why: a model with text features spends almost all of a request in the sentence encoder, and the
encoder's cost per text falls steeply with the batch size (one text: ~10 ms of mostly fixed overhead;
64 texts: ~2 ms each on 2 cores). Encoding each request alone, as `mlflow models serve` does, caps
throughput at the single-text rate. Here requests queue; one worker takes *everything waiting* when
it becomes free, runs one encoder + booster call for all of it in a thread, and hands each request
its own rows back. Under light load a request is served at once (batch of one); under load, batches
grow by themselves to what arrived while the previous batch ran, plus the stragglers of a short wait
after a shared batch (`collect_s`, see `QueryBatcher`).

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

    def __init__(self, model: ServingModel, max_rows: int = 256, collect_s: float = 0.001) -> None:
        self.model = model
        self.max_rows = max_rows
        self.collect_s = collect_s
        self._last = 0  # requests in the previous batch
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
            first = await self._queue.get()
            if self._last > 1 and self.collect_s > 0:  # the straggler wait, as in QueryBatcher
                await asyncio.sleep(self.collect_s)
            jobs = self._take(first)
            self._last = len(jobs)
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


class QueryBatcher:
    """Concurrent `/search` queries share encoder batches and LanceDB queries, as `/invocations`' texts
    share encoder batches in `Batcher`.

    Why: each query alone paid the encoder's fixed cost and its own LanceDB plan, and eight of them at
    once fought over the cores (42 req/s at 8 connections, 24.6 at 64 with p50 1.9 s, issue 16). Here
    whatever queued while the previous batch ran goes to one worker thread: one encoder call for all
    the texts, then one LanceDB query per distinct (k, filter) with all of its vectors (LanceDB's
    multi-vector query). The event loop only routes. A failing group fails only its own requests.

    It waits `collect_s` (1 ms; `Batcher` does the same) before taking the queue, but only after a batch of
    more than one query: the clients that batch answered send their next queries a moment later, and
    without the wait the worker starts on the few already queued while the rest arrive, so batches
    alternate between a few and the rest (8 connections: 138 req/s, p50 58 ms; with the wait 225 req/s,
    p50 35 ms). A lone client (batches of one) never waits.
    """

    def __init__(self, searcher: Any, max_queries: int = 64, collect_s: float = 0.001) -> None:
        self.searcher = searcher
        self.max_queries = max_queries
        self.collect_s = collect_s
        self._last = 0  # queries in the previous batch
        self._queue: asyncio.Queue[tuple[tuple[str, int, str | None], asyncio.Future]] | None = None
        self._worker: asyncio.Task | None = None
        self.batches = 0
        self.queries = 0

    async def search(self, query: str, k: int, where: str | None) -> list[dict]:
        """The query's hits (raises what its encoder batch or its LanceDB query raised)."""
        loop = asyncio.get_running_loop()
        if self._queue is None:  # the queue must belong to the serving event loop
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._run())
        future = loop.create_future()
        await self._queue.put(((query, k, where), future))
        return await future

    def run_batch(self, items: list[tuple[str, int, str | None]]) -> list[list[dict] | BaseException]:
        """In a worker thread: embed every query at once, then one LanceDB query per (k, filter)."""
        vectors = self.searcher.embed_many([query for query, _, _ in items])
        groups: dict[tuple[int, str | None], list[int]] = {}
        for i, (_, k, where) in enumerate(items):
            groups.setdefault((k, where), []).append(i)
        results: list[list[dict] | BaseException] = [[] for _ in items]
        for (k, where), positions in groups.items():
            try:
                hits: list = self.searcher.search_vectors(vectors[positions], k, where)
            except Exception as exc:  # noqa: BLE001 - handed to this group's requests
                hits = [exc] * len(positions)
            for i, found in zip(positions, hits):
                results[i] = found
        return results

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            jobs = [await self._queue.get()]
            if self._last > 1 and self.collect_s > 0:
                await asyncio.sleep(self.collect_s)
            while len(jobs) < self.max_queries and not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            self._last = len(jobs)
            self.batches += 1
            self.queries += len(jobs)
            try:
                results = await run_in_threadpool(self.run_batch, [item for item, _ in jobs])
            except Exception as exc:  # noqa: BLE001 - the encoder failed: every query of the batch
                results = [exc] * len(jobs)
            for (_, future), result in zip(jobs, results):
                if future.done():  # the client went away
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
