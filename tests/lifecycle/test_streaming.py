"""Streaming helpers: a content hash blind to batching but not to values, and a read-ahead that
neither loses errors nor outlives its consumer."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest

from lifecycle.streaming import ContentHash, prefetch


def test_content_hash_sees_values_nulls_and_order_not_chunking():
    def digest(*tables: pa.Table) -> str:
        hasher = ContentHash()
        for table in tables:
            hasher.update(table)
        return hasher.hexdigest()

    table = pa.table({"id": pa.array([1, 2, 3, 4], pa.int64()), "x": pa.array([0.5, None, 2.0, 0.0]),
                      "s": pa.array(["a", "", None, "dd"])})
    base = digest(table)
    assert digest(table.slice(0, 1), table.slice(1, 2), table.slice(3)) == base
    assert digest(pa.Table.from_batches(table.to_batches(max_chunksize=3))) == base
    assert digest(table.set_column(2, "s", pa.array(["a", "", "", "dd"]))) != base  # null is not ""
    assert digest(table.set_column(1, "x", pa.array([0.5, 0.0, 2.0, 0.0]))) != base  # null is not 0
    assert digest(table.set_column(2, "s", pa.array(["a", "", None, "d"]))) != base
    assert digest(table.set_column(2, "s", pa.array(["", "a", None, "dd"]))) != base  # same bytes, other rows
    assert digest(table.slice(1), table.slice(0, 1)) != base  # order matters


def test_prefetch_keeps_order_and_stays_bounded():
    produced = []

    def numbers():
        for i in range(50):
            produced.append(i)
            yield i

    seen = []
    for item in prefetch(numbers(), depth=2):
        time.sleep(0.002)
        assert len(produced) - len(seen) <= 4  # depth queued + one being handed over + one in production
        seen.append(item)
    assert seen == list(range(50))


def test_prefetch_raises_the_producers_error_in_the_consumer():
    def failing():
        yield 1
        raise ValueError("bad row 2")

    got = []
    with pytest.raises(ValueError, match="bad row 2"):
        for item in prefetch(failing()):
            got.append(item)
    assert got == [1]


def test_leaving_early_stops_and_closes_the_producer():
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    before = threading.active_count()
    for item in prefetch(endless()):
        if item == 3:
            break
    assert closed.wait(5)
    assert threading.active_count() == before
