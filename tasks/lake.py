"""The lake's tables: each dataset is a Delta Lake table under `datasets/<name>/` (delta-rs).

Why this shape:
- A dataset version is a table version. Spark, Trino, polars and DuckDB read the same table, time
  travel (`DeltaTable(uri, version=n)`) reads any past version, and a commit is one atomic write of
  `_delta_log/<n>.json` (on S3 a conditional put: `ObjectStore.delta_storage_options`).
- Every commit this project makes carries its own facts as commit metadata (`lifecycle.*`): the files
  it added in row order, the hash of the rows it added and of the whole table after it, the table's
  row count and label set. A `DatasetVersion` is rebuilt from the log alone (`version_record`), and the
  table-level checks read these few values instead of the table.
- Commits never let delta-rs retry on a conflict (`max_commit_retries=0`): the metadata above is
  computed against the version read, so a writer that loses the race re-reads the table, re-checks
  what the winner added and commits again itself (tasks/ingest.py).
- Row order: Delta does not order a snapshot's files; the added files of each commit, oldest commit
  first, do. Files another writer added (no `lifecycle.files`) follow in path order.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from infra_blocks import ObjectStore
from lifecycle.errors import LifecycleError
from lifecycle.records import DatasetVersion

if TYPE_CHECKING:
    import pandas as pd
    from deltalake import DeltaTable

META = "lifecycle."
MAX_LABELS = 1000


class CommitConflict(Exception):
    """Another writer committed the version this one read the table at: re-read and try again."""


def table_key(name: str) -> str:
    return f"datasets/{name}"


def table_uri(store: ObjectStore, name: str) -> str:
    """The table's URI for delta-rs: a plain path in a file lake, `s3://bucket/prefix/...` on S3."""
    return store.uri(table_key(name)) if store.protocol != "file" else store.path(table_key(name))


def open_table(store: ObjectStore, name: str, version: int | None = None) -> DeltaTable | None:
    """The dataset's Delta table (at `version`, else the latest), or None when there is none yet."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    with store.unreachable_as_error(table_key(name)):
        try:
            return DeltaTable(table_uri(store, name), version=version, storage_options=store.delta_storage_options())
        except TableNotFoundError:
            return None


@dataclass(frozen=True)
class Commit:
    """What one lifecycle commit recorded about itself (its `lifecycle.*` commit metadata)."""

    version: int
    files: tuple[str, ...]
    added_rows: int
    added_hash: str
    content_hash: str
    base: int
    labels: tuple[str, ...] | None
    fields: dict[str, str]
    timestamp: int = 0  # commit time, ms since the epoch

    @classmethod
    def from_history(cls, entry: dict[str, Any]) -> Commit | None:
        if f"{META}content_hash" not in entry:
            return None
        labels = entry.get(f"{META}labels")
        return cls(version=int(entry["version"]), files=tuple(json.loads(entry.get(f"{META}files", "[]"))),
                   added_rows=int(entry.get(f"{META}added_rows", 0)), added_hash=str(entry.get(f"{META}added_hash")),
                   content_hash=str(entry[f"{META}content_hash"]), base=int(entry.get(f"{META}base", 0)),
                   labels=tuple(json.loads(labels)) if labels is not None else None,
                   fields={k[len(META):]: str(v) for k, v in entry.items() if k.startswith(META)},
                   timestamp=int(entry.get("timestamp") or 0))


@dataclass
class TableState:
    """A table version as the lifecycle sees it: files in row order, rows, hashes and label set."""

    name: str
    table: DeltaTable
    version: int
    schema: pa.Schema
    commits: list[Commit]
    sizes: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    actions: pa.Table | None = None  # the version's add actions, stats flattened (`min.<col>`, `max.<col>`)

    @property
    def head(self) -> Commit | None:
        return self.commits[-1] if self.commits else None

    @property
    def base(self) -> int:
        """The version the current rows start at (the last overwrite, else 0)."""
        return self.head.base if self.head else 0

    @property
    def files(self) -> list[str]:
        """The version's files (paths relative to the table) in row order."""
        ordered = [f for c in self.commits if c.version >= self.base for f in c.files if f in self.sizes]
        known = set(ordered)
        return ordered + sorted(f for f in self.sizes if f not in known)

    @property
    def rows(self) -> int:
        return sum(self.counts.values())

    @property
    def content_hash(self) -> str:
        """The head commit's table hash; salted with the file list when other writers committed since."""
        head = self.head
        if head is not None and head.version == self.version:
            return head.content_hash
        return hashlib.sha256(f"{head.content_hash if head else ''}|{sorted(self.sizes)}".encode()).hexdigest()

    @property
    def labels(self) -> set[str] | None:
        """The table's label set as the head commit recorded it (None: not recorded)."""
        head = self.head
        return set(head.labels) if head is not None and head.labels is not None else None

    def committed(self, app_id: str) -> bool:
        """Whether a commit with this app transaction is in the table (Delta's idempotent writes)."""
        return self.table.transaction_version(app_id) is not None

    def keys(self, files: list[str] | None = None) -> list[str]:
        return [f"{table_key(self.name)}/{f}" for f in (self.files if files is None else files)]

    def window(self, commits: int | None = None, days: float | None = None) -> list[str]:
        """Keys of the files the latest `commits` lifecycle commits added (or those of the latest `days`
        before the head commit), in row order; commits before the last overwrite are never included."""
        since = [c for c in self.commits if c.version >= self.base]
        if commits is not None:
            chosen = since[-commits:]
        else:
            last = since[-1].timestamp if since else 0
            chosen = [c for c in since if c.timestamp >= last - (days or 0) * 86_400_000]
        added = {f for c in chosen for f in c.files}
        return self.keys([f for f in self.files if f in added])

    def int_ranges(self, column: str) -> dict[str, tuple[int, int]]:
        """(min, max) of an integer column per file key, from the commit stats (files without them left out).

        Integers only: writers may truncate string bounds (Spark keeps 32 characters), and a truncated
        max would let a check skip a file that holds the value.
        """
        if self.actions is None or f"min.{column}" not in self.actions.column_names:
            return {}
        if not pa.types.is_integer(self.actions.schema.field(f"min.{column}").type):
            return {}
        lows, highs = self.actions.column(f"min.{column}").to_pylist(), self.actions.column(f"max.{column}").to_pylist()
        paths = self.actions.column("path").to_pylist()
        return {f"{table_key(self.name)}/{p}": (lo, hi) for p, lo, hi in zip(paths, lows, highs)
                if lo is not None and hi is not None}


def table_state(store: ObjectStore, name: str, version: int | None = None) -> TableState | None:
    """The table at `version` (else the latest) with its lifecycle commits; None when there is no table.

    History is read from the latest table and cut at `version`: delta-rs numbers the history of a table
    loaded at an old version wrongly (seen with 1.6.6).
    """
    latest = open_table(store, name)
    if latest is None:
        return None
    with store.unreachable_as_error(table_key(name)):
        snapshot = latest if version is None or version == latest.version() else open_table(store, name, version)
        if snapshot is None:
            raise LifecycleError(f"{table_uri(store, name)}: no version {version}")
        at = snapshot.version()
        commits = [c for c in (Commit.from_history(e) for e in reversed(latest.history())) if c and c.version <= at]
        return _state(name, snapshot, commits)


def state_after(store: ObjectStore, before: TableState, version: int) -> TableState:
    """The table at `version`, a commit this process just made on top of `before`.

    Why not `table_state`: reopening the table and reading its whole history again cost ~70 ms against
    S3 (a DeltaTable open lists the log; the history is one read per version), an eighth of a 1 % append.
    Here `before`'s table reads only the new log entries and the one new commit. When the table is no
    longer exactly one commit past `before` (another writer committed in between or since, or a schema
    commit came first), it is read in full as before. Either way `before.table` has moved on to the
    latest version afterwards, so `before` must not be used again.
    """
    with store.unreachable_as_error(table_key(before.name)):
        table = before.table
        table.update_incremental()
        if version == before.version + 1 and table.version() == version:
            new = [c for c in (Commit.from_history(e) for e in table.history(limit=1)) if c and c.version == version]
            if new:
                return _state(before.name, table, [*before.commits, *new])
    state = table_state(store, before.name, version)
    assert state is not None  # `before` was read from this table
    return state


def _state(name: str, table: DeltaTable, commits: list[Commit]) -> TableState:
    actions = pa.table(table.get_add_actions(flatten=True))
    paths = actions.column("path").to_pylist()
    sizes = dict(zip(paths, actions.column("size_bytes").to_pylist()))
    counts = dict(zip(paths, [n or 0 for n in actions.column("num_records").to_pylist()]))
    schema = pa.schema(table.schema().to_arrow())
    return TableState(name=name, table=table, version=table.version(), schema=schema, commits=commits, sizes=sizes,
                      counts=counts, actions=actions)


def chained_hash(previous: str | None, added: str) -> str:
    """The table hash after an append: the table before it and the rows added, in that order."""
    return added if previous is None else hashlib.sha256(f"{previous}+{added}".encode()).hexdigest()


@dataclass(frozen=True)
class NewFile:
    """A Parquet file written into the table location, not yet committed."""

    path: str  # relative to the table
    size: int
    rows: int
    null_counts: dict[str, int] = field(default_factory=dict)
    bounds: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # column → (min, max), for the stats

    def stats(self) -> str:
        """The Delta `stats` of the file: row and null counts, and min/max where known (readers prune by them)."""
        stats: dict[str, Any] = {"numRecords": self.rows, "nullCount": self.null_counts}
        if self.bounds:
            stats["minValues"] = {c: lo for c, (lo, _) in self.bounds.items()}
            stats["maxValues"] = {c: hi for c, (_, hi) in self.bounds.items()}
        return json.dumps(stats)


def int_bounds(values: pa.ChunkedArray, bounds: tuple[int, int] | None) -> tuple[int, int] | None:
    """The running (min, max) of an integer column (None for other types or all nulls), for a file's stats.

    Ingest keeps it for the id column: the audit's id check then skips earlier files whose range holds
    none of a landing's ids, so an append of fresh ids reads no old ids at all.
    """
    import pyarrow.compute as pc

    if not pa.types.is_integer(values.type) or values.null_count == len(values):
        return bounds
    found = pc.min_max(values)
    lo, hi = found["min"].as_py(), found["max"].as_py()
    return (lo, hi) if bounds is None else (min(bounds[0], lo), max(bounds[1], hi))


def commit_files(store: ObjectStore, state: TableState | None, name: str, files: list[NewFile], schema: pa.Schema,
                 mode: str, metadata: dict[str, Any], app_ids: list[str]) -> int:
    """Commit files already in the table location as one Delta commit; returns its version.

    Raises:
        CommitConflict: another writer committed first (or created the table first).
    """
    from deltalake import Schema
    from deltalake.exceptions import CommitFailedError, DeltaError
    from deltalake.transaction import (
        AddAction,
        CommitProperties,
        RemoveAction,
        Transaction,
        create_table_with_add_actions,
    )

    now = int(time.time() * 1000)
    adds: list[AddAction | RemoveAction] = [
        AddAction(f.path, f.size, {}, now, True, f.stats()) for f in files]
    props = CommitProperties(custom_metadata={f"{META}{k}": str(v) for k, v in metadata.items()}, max_commit_retries=0,
                             app_transactions=[Transaction(a, 1) for a in app_ids])
    with store.unreachable_as_error(table_key(name)):
        try:
            if state is None:
                create_table_with_add_actions(table_uri(store, name), Schema.from_arrow(schema), adds,  # type: ignore[arg-type]
                                          mode="error",
                                              storage_options=store.delta_storage_options(), commit_properties=props)
                return 0
            state.table.create_write_transaction(adds, mode=mode, schema=schema, commit_properties=props)
            return state.version + 1
        except CommitFailedError as exc:
            raise CommitConflict(str(exc)) from exc
        except DeltaError as exc:
            if state is None and "already exists" in str(exc):
                raise CommitConflict(str(exc)) from exc
            raise


def add_columns(state: TableState, fields: list[pa.Field]) -> None:
    """Add nullable columns to the table's schema (a metadata-only commit before the data commit)."""
    from deltalake import Field, Schema

    delta = Schema.from_arrow(pa.schema(fields))
    state.table.alter.add_columns([Field(f.name, f.type, nullable=True) for f in delta.fields])


def version_record(store: ObjectStore, name: str, version: int | None = None,
                   state: TableState | None = None) -> DatasetVersion:
    """The DatasetVersion of a table version, built from the Delta log alone (time travel included).

    Raises:
        LifecycleError: there is no such table or version, or that version was not made by the lifecycle.
    """
    state = state or table_state(store, name, version)
    if state is None:
        raise LifecycleError(f"{table_uri(store, name)}: no Delta table")
    head = state.head
    if head is None:
        raise LifecycleError(f"{table_uri(store, name)}@{state.version}: not written by the lifecycle")
    parts = state.keys()
    schema = {f.name: str(f.type) for f in state.schema}
    return DatasetVersion.model_validate(dict(
        id=state.content_hash[:16], dataset=name, code_version=head.fields.get("code_version", ""),
        source=head.fields.get("source", ""), path=table_key(name), parts=parts, rows=state.rows,
        bytes=sum(state.sizes.values()), schema=schema, spec_hash=head.fields.get("spec_hash", ""),
        table_version=state.version, added_files=state.keys(list(head.files)) if head.version == state.version else [],
        added_rows=head.added_rows if head.version == state.version else 0, content_hash=state.content_hash,
        added_hash=head.added_hash if head.version == state.version else "",
    ))


def check_schema(table: pa.Schema, landing: pa.Schema, allowed_new: list[str], where: str) -> list[pa.Field]:
    """Refuse a landing whose columns do not fit the table; returns the allowed new columns it adds.

    Raises:
        LifecycleError: a table column is missing, a column's type changed, or a column is unknown
            (not in the table nor in `ingest.allow_new_columns`); one line naming the column.
    """
    for f in table:
        if f.name not in landing.names:
            raise LifecycleError(f"{where}: column {f.name!r} of the table is missing; nothing committed")
    new = []
    for f in landing:
        if f.name not in table.names:
            if f.name not in allowed_new:
                raise LifecycleError(f"{where}: column {f.name!r} is not in the table (list it in "
                                     "ingest.allow_new_columns to add it); nothing committed")
            new.append(f)
        elif table.field(f.name).type != f.type:
            raise LifecycleError(f"{where}: column {f.name!r} is {f.type}, the table has "
                                 f"{table.field(f.name).type}; nothing committed")
    return new


def read_dataset(store: ObjectStore, dataset: DatasetVersion, columns: list[str] | None = None) -> pd.DataFrame:
    """Exactly that table version as a DataFrame, rows in commit order (small data and tests; stages
    stream `dataset.parts`). Files written before a column was added read it as nulls."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    pafs = store.pyarrow_filesystem()
    paths = [store.path(k) for k in dataset.parts]
    schema = pa.unify_schemas([pq.read_schema(p, filesystem=pafs) for p in paths])
    return pads.dataset(paths, schema=schema, format="parquet", filesystem=pafs).to_table(columns=columns).to_pandas()
