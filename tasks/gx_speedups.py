"""Scoped fixes for where Great Expectations' pandas engine spends time without changing any result.

Why this exists: on the validate stage's frames GX spent most of its time on work that no result reads
(measured at 10M sample rows, 2 cores): hashing the whole frame only to label the batch, copying every
column for every column check, and compiling Data Docs' Jinja templates again for each page. Each fix
patches one GX attribute while at least one run needs it (runs may overlap in threads: the first in
installs it, the last out restores it, also when installing another one fails). The column narrowing
acts only on the threads of the runs that asked for it. `tests/tasks/test_gx_speedups.py` checks
that verdicts, counts and failure details are those of GX unpatched, and that a run on another thread
keeps whole rows; Data Docs pages are the same but for the batch fingerprint row, no longer computed.

GX is imported inside the functions: it costs seconds to import.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any


Undo = Callable[[], None]


def frame_fingerprint_skipped() -> Undo:
    """Skip GX's batch fingerprint.

    GX's pandas engine hashes every frame under 1 GB in full (`hash_pandas_object`, ~0.7 s per 1M rows
    here, as much as all expectations together) only to label the batch. The dataset version id already
    is a content hash of these rows, so the fingerprint adds nothing but time.
    """
    import great_expectations.execution_engine.pandas_execution_engine as engine

    previous = engine.HASH_THRESHOLD
    engine.HASH_THRESHOLD = 0

    def undo() -> None:
        engine.HASH_THRESHOLD = previous

    return undo


def column_domains_narrowed() -> Undo:
    """Give each single-column metric a frame of its own column only, in the runs that asked for it.

    GX hands every column metric the whole batch, and its map metrics then filter that batch
    (`df[df[column].notnull()]` for the condition, again for the unexpected index list), copying
    *every* column each time: 0.8 s of `take` on string columns no check reads, at 10M rows. Row
    conditions are applied before the narrowing, on the whole batch; column-pair, multi-column and
    table domains are left whole.

    Only for result formats that read no other column of the row: `validate_frame`'s SUMMARY (no
    `unexpected_index_column_names`, no `include_unexpected_rows`; a test holds it to that). It applies
    only on threads inside `gx_speedups(["narrow", ...])`, so another GX user in the process, on
    another thread, always gets whole rows.
    """
    from great_expectations.execution_engine.pandas_execution_engine import PandasExecutionEngine

    original = PandasExecutionEngine.get_domain_records

    def get_domain_records(self: Any, domain_kwargs: dict) -> Any:
        data = original(self, domain_kwargs)
        column = domain_kwargs.get("column")
        if _active_here("narrow") and column is not None and column in data.columns and data.shape[1] > 1:
            return data[[column]]
        return data

    PandasExecutionEngine.get_domain_records = get_domain_records  # type: ignore[method-assign]

    def undo() -> None:
        PandasExecutionEngine.get_domain_records = original  # type: ignore[method-assign]

    return undo


_template_code: dict[str, bytes] = {}


def templates_compiled_once() -> Undo:
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

    def undo() -> None:
        DefaultJinjaView.__init__ = original  # type: ignore[method-assign]

    return undo


SPEEDUPS: dict[str, Callable[[], Undo]] = {
    "fingerprint": frame_fingerprint_skipped,
    "narrow": column_domains_narrowed,
    "templates": templates_compiled_once,
}
_lock = threading.Lock()
_users: dict[str, int] = {}
_undo: dict[str, Undo] = {}
_here = threading.local()  # per thread: how many open gx_speedups blocks asked for each fix


def _active_here(name: str) -> bool:
    return getattr(_here, "names", {}).get(name, 0) > 0


@contextmanager
def gx_speedups(names: Collection[str] = tuple(SPEEDUPS)) -> Iterator[None]:
    """The named fixes (default: all), installed for as long as any run inside this block needs them."""
    unknown = set(names) - set(SPEEDUPS)
    if unknown:
        raise ValueError(f"unknown GX speedup(s): {', '.join(sorted(unknown))}")
    wanted = [n for n in SPEEDUPS if n in names]
    entered: list[str] = []
    mine: dict[str, int] = _here.__dict__.setdefault("names", {})
    try:
        with _lock:
            for name in wanted:
                if not _users.get(name):
                    _undo[name] = SPEEDUPS[name]()
                _users[name] = _users.get(name, 0) + 1
                entered.append(name)
                mine[name] = mine.get(name, 0) + 1
        yield
    finally:
        with _lock:
            for name in reversed(entered):
                mine[name] -= 1
                _users[name] -= 1
                if not _users[name]:
                    _undo.pop(name)()
