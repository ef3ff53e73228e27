"""Scoped fixes for where Great Expectations' pandas engine spends time without changing any result.

Why this exists: on the validate stage's frames GX spent most of its time on work that no result reads
(measured at 10M sample rows, 2 cores): hashing the whole frame only to label the batch, copying every
column for every column check, compiling Data Docs' Jinja templates again for each page, and (a fixed
cost that grows with the frame) re-reading an unchanged checkpoint to prove it fresh, and (the fixed
cost of every run) serialising each expectation again each time its configuration is read. Each fix
patches one GX attribute while at least one run needs it (runs may overlap in threads: the first in
installs it, the last out restores it, also when installing another one fails). The column narrowing
acts only on the threads of the runs that asked for it. `tests/tasks/test_gx_speedups.py` checks
that verdicts, counts and failure details are those of GX unpatched, and that a run on another thread
keeps whole rows; Data Docs pages are the same but for the batch fingerprint row, no longer computed.

Each fix patches GX internals, not its API, so each declares the GX versions it was written against
and the shape of what it patches (an attribute's parameters or type). Before the first install in a
process both are checked; a fix that does not match, or whose install raises, is left off for the rest
of the process with one warning, and GX runs unpatched: a speed-up must never take the quality gate
down. Widen `GX_VERSIONS` only after `tests/tasks/test_gx_speedups.py` passed on the new version.

GX is imported inside the functions: it costs seconds to import.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import numbers
import threading
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

Undo = Callable[[], None]
# The GX releases whose internals the fixes below were read from and tested on (exact: GX moves its
# internals in patch releases too).
GX_VERSIONS = ("1.24.1",)


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


def checkpoint_taken_as_fresh() -> Undo:
    """Skip a checkpoint's own freshness look-up, in the runs that asked for it.

    `Checkpoint.run` first checks that the checkpoint equals what its store holds: a store read and a
    deep comparison of the checkpoint, its validation definitions and the suite, a cost that grows with
    the frame (0.04 s a run on a 100k-row landing, 0.5 s on a 10M-row frame: a third of that GX run).
    `tasks.validation.SuiteRuns` adds its checkpoint and never changes it, so it is fresh by
    construction. `ValidationDefinition.run` still checks its own freshness (and records the suite's
    owner) as GX does; a checkpoint that was never added is still refused.
    """
    from great_expectations.checkpoint.checkpoint import Checkpoint
    from great_expectations.core.freshness_diagnostics import CheckpointFreshnessDiagnostics

    original = Checkpoint.is_fresh

    def is_fresh(self: Any) -> Any:
        if _active_here("fresh") and self.id:
            return CheckpointFreshnessDiagnostics(errors=[])
        return original(self)

    Checkpoint.is_fresh = is_fresh  # type: ignore[method-assign]

    def undo() -> None:
        Checkpoint.is_fresh = original  # type: ignore[method-assign]

    return undo


def configurations_built_once() -> Undo:
    """Build each expectation's configuration once per run, in the runs that asked for it.

    `Expectation.configuration` is a property that serialises the expectation (a pydantic `dict`) into a
    new ExpectationConfiguration on every access, and GX asks for it ~2,400 times in one run of our
    file suite: ~35 % of a run's fixed cost, and a run on a 1 % landing is almost all fixed cost (0.14 s
    on 1,000 rows, 0.15 s on 100k). Inside a `gx_speedups(["configs"])` block on this thread the first
    configuration of each expectation is kept, with the expectation itself (so its id cannot be reused),
    and handed out again. The cache ends with the block: an expectation changed between runs is
    serialised afresh.
    """
    from great_expectations.expectations.expectation import Expectation

    original: property = Expectation.__dict__["configuration"]
    build = original.fget
    assert build is not None

    def configuration(self: Any) -> Any:
        # Set only while this thread is inside a "configs" block (gx_speedups), so it is the activity check too.
        cache: dict[int, tuple[Any, Any]] | None = getattr(_here, "configs", None)
        if cache is None:
            return build(self)
        found = cache.get(id(self))
        if found is None:
            found = cache[id(self)] = (self, build(self))
        return found[1]

    Expectation.configuration = property(configuration)  # type: ignore[assignment,method-assign]

    def undo() -> None:
        Expectation.configuration = original  # type: ignore[assignment,method-assign]

    return undo


@dataclass(frozen=True)
class Speedup:
    """One fix and what it relies on, checked before it is installed.

    Attributes:
        install: Patches GX and returns the function that undoes it.
        module: The GX module that holds the patched attribute.
        attribute: The attribute inside `module`, dotted (`Class.method`).
        expects: The callable's parameter names, or the type of a plain value.
        gx_versions: The GX versions the fix was written against.
    """

    install: Callable[[], Undo]
    module: str
    attribute: str
    expects: tuple[str, ...] | type
    gx_versions: tuple[str, ...] = GX_VERSIONS


SPEEDUPS: dict[str, Speedup] = {
    "fingerprint": Speedup(frame_fingerprint_skipped, "great_expectations.execution_engine.pandas_execution_engine",
                           "HASH_THRESHOLD", numbers.Real),
    "narrow": Speedup(column_domains_narrowed, "great_expectations.execution_engine.pandas_execution_engine",
                      "PandasExecutionEngine.get_domain_records", ("self", "domain_kwargs")),
    "fresh": Speedup(checkpoint_taken_as_fresh, "great_expectations.checkpoint.checkpoint", "Checkpoint.is_fresh",
                     ("self",)),
    "configs": Speedup(configurations_built_once, "great_expectations.expectations.expectation",
                       "Expectation.configuration", property),
    "templates": Speedup(templates_compiled_once, "great_expectations.render.view.view", "DefaultJinjaView.__init__",
                         ("self", "custom_styles_directory", "custom_views_directory")),
}
_lock = threading.Lock()
_users: dict[str, int] = {}
_undo: dict[str, Undo] = {}
_off: dict[str, str] = {}  # fixes left off in this process, and why (each is warned about once)
_here = threading.local()  # per thread: how many open gx_speedups blocks asked for each fix


def gx_version() -> str:
    """The installed great-expectations version (package metadata: no GX import)."""
    try:
        return version("great-expectations")
    except PackageNotFoundError:
        return "not installed"


def mismatch(speedup: Speedup) -> str | None:
    """Why a fix does not fit the installed GX (version, missing attribute, other signature), or None."""
    found = gx_version()
    if found not in speedup.gx_versions:
        return f"written for great-expectations {', '.join(speedup.gx_versions)}, found {found}"
    where = f"{speedup.module}.{speedup.attribute}"
    try:
        target: Any = importlib.import_module(speedup.module)
        for part in speedup.attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError):
        return f"{where} not found"
    if isinstance(speedup.expects, type):
        return None if isinstance(target, speedup.expects) else f"{where} is a {type(target).__name__}"
    try:
        names = tuple(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return f"{where} has no signature"
    return None if names == speedup.expects else f"{where} takes ({', '.join(names)})"


def _logger() -> Any:
    """The Prefect run logger inside a flow or task (the warning lands in the run's logs), else stdlib."""
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - MissingContextError outside a run
        return logging.getLogger("lifecycle.gx_speedups")


def _install(name: str) -> Undo | None:
    """Install one fix unless it does not fit or its install raises; then it stays off (caller holds _lock)."""
    if name in _off:
        return None
    speedup = SPEEDUPS[name]
    reason = mismatch(speedup)
    if reason is None:
        try:
            return speedup.install()
        except Exception as exc:  # noqa: BLE001 - any failure of a fix means plain GX, never a failed gate
            reason = f"install failed: {type(exc).__name__}: {exc}"
    _off[name] = reason
    return None


def _active_here(name: str) -> bool:
    return getattr(_here, "names", {}).get(name, 0) > 0


@contextmanager
def gx_speedups(names: Collection[str] = tuple(SPEEDUPS)) -> Iterator[None]:
    """The named fixes (default: all), installed for as long as any run inside this block needs them.

    A fix that does not fit the installed GX is skipped (one warning per process): the block then runs
    GX unpatched for it, with GX's own results.

    Raises:
        ValueError: a name that is no fix (a caller's typo, not a GX change).
    """
    unknown = set(names) - set(SPEEDUPS)
    if unknown:
        raise ValueError(f"unknown GX speedup(s): {', '.join(sorted(unknown))}")
    wanted = [n for n in SPEEDUPS if n in names]
    entered: list[str] = []
    mine: dict[str, int] = _here.__dict__.setdefault("names", {})
    try:
        with _lock:
            warned = set(_off)
            for name in wanted:
                if not _users.get(name):
                    undo = _install(name)
                    if undo is None:
                        continue
                    _undo[name] = undo
                _users[name] = _users.get(name, 0) + 1
                entered.append(name)
                mine[name] = mine.get(name, 0) + 1
            if "configs" in entered and mine["configs"] == 1:  # this thread's outermost block: a new cache
                _here.configs = {}
            new = [n for n in wanted if n in _off and n not in warned]
            if new:
                _logger().warning("GX speed-ups off, running plain Great Expectations: %s",
                                  "; ".join(f"{n} ({_off[n]})" for n in new))
        yield
    finally:
        with _lock:
            for name in reversed(entered):
                mine[name] -= 1
                if name == "configs" and not mine[name]:
                    _here.configs = None
                _users[name] -= 1
                if not _users[name]:
                    _undo.pop(name)()
