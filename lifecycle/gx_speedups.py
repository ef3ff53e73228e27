"""Scoped fixes for where Great Expectations' pandas engine spends time without changing any result.

Why this exists: on the validate stage's frames GX spent most of its time on work that no result reads
(measured at 10M sample rows, 2 cores): hashing the whole frame only to label the batch, copying every
column for every column check, and compiling Data Docs' Jinja templates again for each page. Each fix
is a context manager that patches one GX attribute for the duration of one run and restores it after,
so nothing leaks into other GX users in the process; `tests/tasks/test_validation.py` checks that
results and failure details are those of GX unpatched.

GX is imported inside the functions: it costs seconds to import.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any


@contextmanager
def frame_fingerprint_skipped() -> Iterator[None]:
    """Skip GX's batch fingerprint.

    GX's pandas engine hashes every frame under 1 GB in full (`hash_pandas_object`, ~0.7 s per 1M rows
    here, as much as all expectations together) only to label the batch. The dataset version id already
    is a content hash of these rows, so the fingerprint adds nothing but time.
    """
    import great_expectations.execution_engine.pandas_execution_engine as engine

    previous = engine.HASH_THRESHOLD
    engine.HASH_THRESHOLD = 0
    try:
        yield
    finally:
        engine.HASH_THRESHOLD = previous


@contextmanager
def column_domains_narrowed() -> Iterator[None]:
    """Give each single-column metric a frame of its own column only.

    GX hands every column metric the whole batch, and its map metrics then filter that batch
    (`df[df[column].notnull()]`), which copies *every* column once per expectation: 0.8 s of
    `take` on string columns no check reads, at 10M rows. A column-domain metric reads only its column
    (row conditions are applied before the narrowing, on the whole batch); pandas selects the one
    column without copying it. Column-pair, multi-column and table domains are left whole.
    """
    from great_expectations.execution_engine.pandas_execution_engine import PandasExecutionEngine

    original = PandasExecutionEngine.get_domain_records

    def get_domain_records(self: Any, domain_kwargs: dict) -> Any:
        data = original(self, domain_kwargs)
        column = domain_kwargs.get("column")
        if column is not None and column in data.columns and data.shape[1] > 1:
            return data[[column]]
        return data

    PandasExecutionEngine.get_domain_records = get_domain_records  # type: ignore[method-assign]
    try:
        yield
    finally:
        PandasExecutionEngine.get_domain_records = original  # type: ignore[method-assign]


_template_code: dict[str, bytes] = {}


@contextmanager
def templates_compiled_once() -> Iterator[None]:
    """Compile Data Docs' Jinja templates once per process instead of once per rendered view.

    Every GX view builds its own Jinja environment, so each Data Docs build parses and compiles the
    same ~50 templates again (~0.3 s, a third of a 1M-row validation). A shared bytecode cache keeps
    the compiled code; Jinja checks each entry against the template source's checksum before use.
    """
    from great_expectations.render.view.view import DefaultJinjaView
    from jinja2 import BytecodeCache

    class SharedCode(BytecodeCache):
        def load_bytecode(self, bucket: Any) -> None:
            code = _template_code.get(bucket.key)
            if code is not None:
                bucket.bytecode_from_string(code)

        def dump_bytecode(self, bucket: Any) -> None:
            _template_code[bucket.key] = bucket.bytecode_to_string()

    original = DefaultJinjaView.__init__
    cache = SharedCode()

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.env.bytecode_cache = cache

    DefaultJinjaView.__init__ = __init__  # type: ignore[method-assign]
    try:
        yield
    finally:
        DefaultJinjaView.__init__ = original  # type: ignore[method-assign]


SPEEDUPS: dict[str, Callable[[], AbstractContextManager[None]]] = {
    "fingerprint": frame_fingerprint_skipped,
    "narrow": column_domains_narrowed,
    "templates": templates_compiled_once,
}


@contextmanager
def gx_speedups(names: Collection[str] = tuple(SPEEDUPS)) -> Iterator[None]:
    """The named fixes (default: all), for one GX run."""
    unknown = set(names) - set(SPEEDUPS)
    if unknown:
        raise ValueError(f"unknown GX speedup(s): {', '.join(sorted(unknown))}")
    with ExitStack() as stack:
        for name in SPEEDUPS:
            if name in names:
                stack.enter_context(SPEEDUPS[name]())
        yield
