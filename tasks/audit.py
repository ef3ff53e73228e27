"""Audit: the checks new files pass before they are committed to a dataset's table (write–audit–publish).

Why this shape:
- The GX suite (tasks/validation.py) runs on batches of new files, with the expectations that the
  new rows can decide alone (schema, nulls, ranges, allowed labels, ids unique within a batch; across
  batches and the table the id check below decides). A batch is as many whole files as fit in
  `AUDIT_BATCH_BYTES` of Arrow data, so memory is bounded by that budget, not the table, and an append
  costs in proportion to the append. Why batches and not one GX run per file: a GX run costs ~0.45 s
  here whatever its size (its context 0.06 s, its metric graph ~0.29 s, Data Docs ~0.09 s), against
  ~0.12 s per million rows of checks: 10M rows took 20 s as forty 250k-row files, 2.0 s as two batches.
- What only the whole table can decide is checked here without loading it: ids unique across the
  landing and against every earlier file (the id column alone, one file at a time), the table's row
  count (earlier rows from the Delta log's file stats) and its label set (earlier labels from the
  previous commit's metadata). These keep the GX names (`expect_table_row_count_to_be_between`, …),
  so a report reads the same whichever side found the problem.
- `run_validation` (the validate stage's own run, for a version without the audit's report) is the same
  audit applied to the files a version's commit added.
"""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task

from infra_blocks import ObjectStore
from lifecycle.records import DatasetVersion, FailedExpectation, ValidationReport
from lifecycle.spec import DatasetSpec, Task
from tasks.policies import retry_unless_user_error
from tasks.validation import (
    SuiteRuns,
    build_expectations,
    copy_docs,
    docs_prefix,
    make_report,
    read_file_table,
    stored_report,
    to_frame,
    version_label,
)
from tasks.validation_report import EXAMPLES, describe_failure

ROW_COUNT = "expect_table_row_count_to_be_between"
LABEL_COUNT = "expect_column_unique_value_count_to_be_between"
UNIQUE = "expect_column_values_to_be_unique"
TABLE_LEVEL = frozenset({ROW_COUNT, LABEL_COUNT})
# Arrow bytes per GX run. A batch costs ~2.5x its Arrow size at its peak (Parquet decoding, the frame,
# GX's views): 4M sample rows (452 MiB) took RSS from 236 MB to 1.36 GB. With 512 MiB batches a 5 GB
# CSV landing peaked at 2.19 GB, past the 2 GB this stage is held to; 256 MiB keeps it well inside.
AUDIT_BATCH_BYTES = 256 * 2**20


@dataclass
class Audit:
    """The verdict on new files, and what the table holds once they are committed."""

    success: bool
    evaluated: int
    failed: list[FailedExpectation] = field(default_factory=list)
    rows: int = 0
    labels: set[str] | None = None


def file_expectations(spec: DatasetSpec) -> list:
    """The suite's expectations that one file decides alone (all but the table-level ones)."""
    return [e for e in build_expectations(spec) if e.expectation_type not in TABLE_LEVEL]


def _column(store: ObjectStore, key: str, column: str) -> pa.ChunkedArray:
    return pq.read_table(store.path(key), columns=[column], filesystem=store.pyarrow_filesystem()).column(0)


def _examples(values: np.ndarray) -> str:
    shown = [str(v) for v in values[:EXAMPLES].tolist()]
    return f", e.g. {', '.join(shown)}" if shown else ""


def _ids(store: ObjectStore, key: str, column: str) -> np.ndarray:
    """A file's non-null ids as a NumPy array (int64, or objects for string ids)."""
    values = _column(store, key, column).drop_null()
    return values.to_numpy() if pa.types.is_integer(values.type) else np.asarray(values.to_pylist(), dtype=object)


def id_failures(store: ObjectStore, spec: DatasetSpec, new: list[str], earlier: list[str],
                ranges: dict[str, tuple[int, int]] | None = None) -> list[str]:
    """Details of ids that are not unique across the new files or already in an earlier file.

    Reads the id column only. `ranges` holds the (min, max) id of files where known (the Delta stats of
    committed files, the writer's bounds of new ones), and two things follow from it:
    - New files are checked in groups whose ranges overlap (every file its own group for ids that grow,
      as generated or time-ordered ids do); uniqueness inside one file is the GX suite's. Memory is the
      ids of one group plus one earlier file's, never the landing's or the table's: a 5 GB landing's
      54M ids held at once were most of its ingest's peak memory.
    - An earlier file whose range holds none of a group's ids is not read for it: appending 1 % of fresh
      ids to a 10M-row table otherwise spent most of its audit reading old ids. A group of one file
      that no earlier file's range meets is not read at all (0.4 s of a 1M-row ingest on S3).
    Within a group the ids are sorted once (a hash set costs ~75 bytes an id, the sorted array 8) and
    each earlier file's ids looked up in them by binary search.
    """
    ranges = ranges or {}
    repeated_n, repeated_ex, seen, found = 0, np.array([], dtype=object), 0, np.array([], dtype=object)
    for group in _overlapping(new, ranges, earlier):
        clash = _earlier_in_range(group, ranges, earlier)
        if len(group) == 1 and not clash:
            continue  # ids unique inside a file are the GX suite's; no earlier file's range meets this one's
        ids = np.sort(np.concatenate([_ids(store, k, spec.id_column) for k in group]))
        same = ids[1:] == ids[:-1]
        if len(group) > 1 and same.any():
            repeated = np.unique(ids[1:][same])
            repeated_n, repeated_ex = repeated_n + len(repeated), np.concatenate([repeated_ex, repeated[:EXAMPLES]])
        unique = ids[np.concatenate(([True], ~same))] if len(ids) else ids
        del ids, same
        for key in clash:
            if key in ranges and len(unique) and unique.dtype != object:
                lo, hi = ranges[key]
                if np.searchsorted(unique, lo, "left") == np.searchsorted(unique, hi, "right"):
                    continue
            old = _ids(store, key, spec.id_column)
            if len(unique) == 0 or len(old) == 0 or (old.dtype == object) != (unique.dtype == object):
                continue  # a changed id type is refused by the schema check before any audit
            at = np.minimum(np.searchsorted(unique, old), len(unique) - 1)
            hits = old[unique[at] == old]
            seen += len(hits)
            if len(found) < EXAMPLES:
                found = np.concatenate([found, hits[:EXAMPLES]])
    details = []
    if repeated_n:
        details.append(f"{repeated_n} id{'s' if repeated_n != 1 else ''} repeated across the new "
                       f"files{_examples(np.sort(repeated_ex))}")
    if seen:
        details.append(f"{seen} id{'s' if seen != 1 else ''} already in the table{_examples(found)} "
                       "(a source that is a whole new snapshot needs `ingest: {mode: replace}` in the spec)")
    return details


def _overlapping(new: list[str], ranges: dict[str, tuple[int, int]], earlier: list[str]) -> list[list[str]]:
    """The new files in groups whose id ranges overlap, in file order; one group when a range is unknown
    (a new file's, or an earlier file's: each earlier file would then be read once per group)."""
    if not new:
        return []
    if any(k not in ranges for k in new) or any(k not in ranges for k in earlier):
        return [list(new)]
    groups: list[list[str]] = []
    top = None
    for key in sorted(new, key=lambda k: ranges[k]):
        lo, hi = ranges[key]
        if top is None or lo > top:
            groups.append([key])
            top = hi
        else:
            groups[-1].append(key)
            top = max(top, hi)
    return groups


def _earlier_in_range(group: list[str], ranges: dict[str, tuple[int, int]], earlier: list[str]) -> list[str]:
    """The earlier files whose ids may meet the group's: every one when a range is unknown."""
    if any(k not in ranges for k in group):
        return list(earlier)
    lo, hi = min(ranges[k][0] for k in group), max(ranges[k][1] for k in group)
    return [k for k in earlier if k not in ranges or (ranges[k][0] <= hi and ranges[k][1] >= lo)]


def labels_of(store: ObjectStore, spec: DatasetSpec, keys: list[str]) -> set[str]:
    found: set[str] = set()
    for key in keys:
        found.update(v for v in pc.unique(_column(store, key, spec.label_column)).to_pylist() if v is not None)
    return found


class FileChecks:
    """The GX suite's verdicts on the new rows, one GX run per batch (`check`), gathered for the audit.

    Ingest `add`s the rows it writes, as it writes them, and `flush`es at the end (no read back from the
    store: at 10M rows on S3 reading the files back cost as much as the GX runs); `audit_files` without
    it reads the files in batches (`_batches`).
    """

    def __init__(self, spec: DatasetSpec, label: str, docs_dir: str, budget: int | None = None) -> None:
        self.spec, self.label, self.docs_dir = spec, label, docs_dir
        self.budget = budget or AUDIT_BATCH_BYTES
        self.success, self.rows, self.runs = True, 0, 0
        self._suite: SuiteRuns | None = None  # one GX context for every batch (tasks.validation.SuiteRuns)
        self.by_check: dict[tuple[str, str | None], list[FailedExpectation]] = {}
        self.labels: set[str] = set()  # the label values of the checked rows (classification)
        self._pending: list[pa.Table] = []
        self._size = 0

    def add(self, table: pa.Table) -> None:
        """Rows as they are written; checked at the end of a file once `budget` Arrow bytes have gathered
        (`end_file`), or at `flush`."""
        self._pending.append(table)
        self._size += table.nbytes

    def end_file(self) -> None:
        """A file is complete. Batches end only here, so every file lies inside one GX run: the suite's
        unique-id check sees all of a file's ids, and `id_failures` needs to compare files only."""
        if self._size >= self.budget:
            self.flush()

    def finish(self) -> None:
        """Check what is pending and render the Data Docs of every batch, once."""
        self.flush()
        if self._suite is not None:
            self._suite.finish()
            self._suite = None

    def flush(self) -> None:
        if self._pending:
            self._size = 0
            self.check(_joined(self._pending))

    def check(self, batch: pa.Table) -> None:
        """Validate one batch (the caller hands over its only reference: the conversion frees it)."""
        self.rows += batch.num_rows
        if self.spec.task is not Task.regression:  # the table's label set, without reading the files back
            self.labels.update(v for v in pc.unique(batch.column(self.spec.label_column)).to_pylist() if v is not None)
        # GX run results are webs of reference cycles that hold the frame until a full collection. The
        # process's older objects are frozen first, so the collection after the run scans only what the
        # run made: a full one cost 0.3 s in an ingest process of a 10M-row table (a 1 % append's audit).
        gc.freeze()
        try:
            frame = to_frame(batch)
            del batch
            if self._suite is None:
                self._suite = SuiteRuns(self.spec, self.docs_dir, self.label, file_expectations(self.spec))
            ok, _, failed = self._suite.run(frame, f"{self.label}-batch{self.runs:04d}")
            self.success, self.runs = self.success and ok, self.runs + 1
            del frame
            gc.collect()
        finally:
            gc.unfreeze()
        pa.default_memory_pool().release_unused()  # the batch's Arrow buffers back to the system, not kept
        for f in failed:
            self.by_check.setdefault((f.expectation, f.column), []).append(f)


def audit_files(store: ObjectStore, spec: DatasetSpec, new: list[str], earlier: list[str], *, earlier_rows: int,
                earlier_labels: set[str] | None, label: str, docs_dir: str,
                id_ranges: dict[str, tuple[int, int]] | None = None,
                batch_bytes: int | None = None, checked: FileChecks | None = None) -> Audit:
    """Validate new files (GX per batch of files, Data Docs into `docs_dir`) and the table they would make.

    Args:
        new: store keys of the new files; earlier: the table's files before them.
        earlier_rows: the table's rows before them; earlier_labels: its label set (None: read it from
            the earlier files' label column).
        label: the name the Data Docs pages carry (`<dataset>@<id>`).
        id_ranges: (min, max) id of new and earlier files, where known (`id_failures`).
        batch_bytes: Arrow bytes per GX run (`_batches`); None: `AUDIT_BATCH_BYTES`.
        checked: the GX verdicts on exactly the rows of `new`, already run (ingest's); None: run here.
    """
    expectations = file_expectations(spec)
    if checked is None:
        checked = FileChecks(spec, label, docs_dir, batch_bytes)
        for batch in _batches(store, new, checked.budget):
            checked.check(batch)
            del batch
    checked.finish()
    by_check, success, rows = checked.by_check, checked.success, checked.rows
    failed = [_merged(found) for found in by_check.values()]

    duplicates = id_failures(store, spec, new, earlier, id_ranges)
    if duplicates:
        same = next((f for f in failed if (f.expectation, f.column) == (UNIQUE, spec.id_column)), None)
        if same is None:
            failed.append(FailedExpectation(expectation=UNIQUE, column=spec.id_column, detail="; ".join(duplicates)))
        else:
            same.detail = "; ".join([same.detail, *duplicates])

    labels = None
    if spec.task is not Task.regression:
        earlier_set = earlier_labels if earlier_labels is not None else labels_of(store, spec, earlier)
        labels = earlier_set | checked.labels
    failed += table_failures(spec, earlier_rows + rows, labels)
    evaluated = len(expectations) + 1 + (spec.task is not Task.regression)
    return Audit(success=success and not failed, evaluated=evaluated, failed=in_suite_order(spec, failed),
                 rows=earlier_rows + rows, labels=labels)


def _batches(store: ObjectStore, keys: list[str], budget: int) -> Iterator[pa.Table]:
    """The files of `keys` in order, as tables of whole files up to `budget` Arrow bytes each (a file
    larger than the budget is a batch of its own; a file whose schema differs, one column more after an
    added nullable column, starts a new batch). Each is yielded as the only reference to it."""
    pending: list[pa.Table] = []
    size = 0
    for key in keys:
        table = read_file_table(store, key)
        if pending and (size + table.nbytes > budget or not table.schema.equals(pending[0].schema)):
            yield _joined(pending)
            size = 0
        size += table.nbytes
        pending.append(table)
        del table
    if pending:
        yield _joined(pending)


def _joined(pending: list[pa.Table]) -> pa.Table:
    """The pending tables as one (zero-copy), emptying the list so the result holds their buffers alone."""
    batch = pa.concat_tables(pending)
    pending.clear()
    return batch


def table_failures(spec: DatasetSpec, rows: int, labels: set[str] | None) -> list[FailedExpectation]:
    """The row-count bounds and the label count, decided on the table's totals."""
    failed = []
    exp = spec.expectations
    if rows < exp.min_rows or (exp.max_rows is not None and rows > exp.max_rows):
        failed.append(FailedExpectation(expectation=ROW_COUNT, detail=describe_failure(
            ROW_COUNT, {"min_value": exp.min_rows, "max_value": exp.max_rows}, {"observed_value": rows}, None)))
    if labels is not None:
        most = 2 if spec.task is Task.binary else None
        if len(labels) < 2 or (most is not None and len(labels) > most):
            detail = describe_failure(LABEL_COUNT, {"min_value": 2, "max_value": most},
                                      {"observed_value": len(labels)}, None)
            if len(labels) < 2:  # in the words of the data: which class, and what the task needs
                only = next(iter(labels), "none")
                detail += (f": label column {spec.label_column!r} has one class ({only}); "
                           f"{spec.task.value} needs two or more")
            failed.append(FailedExpectation(expectation=LABEL_COUNT, column=spec.label_column, detail=detail))
    return failed


def in_suite_order(spec: DatasetSpec, failed: list[FailedExpectation]) -> list[FailedExpectation]:
    rank = {(e.expectation_type, getattr(e, "column", None)): i for i, e in enumerate(build_expectations(spec))}
    return sorted(failed, key=lambda f: rank.get((f.expectation, f.column), len(rank)))


def _merged(found: list[FailedExpectation]) -> FailedExpectation:
    """One failure per expectation and column, however many files failed it."""
    first = found[0]
    if len(found) == 1:
        return first
    return first.model_copy(update={"detail": f"{first.detail}; and in {len(found) - 1} more batch(es) of files"})


def run_validation(store: ObjectStore, spec: DatasetSpec, dataset: DatasetVersion) -> ValidationReport:
    """Validate one dataset version (pure; no Prefect): the files its commit added, each on its own
    (GX), and the table-level checks against the files before them (tasks/audit.py).

    A version not made by a commit (no `added_files`) is validated whole, file by file.
    """
    new = dataset.added_files or dataset.parts
    earlier = [k for k in dataset.parts if k not in set(new)]
    earlier_rows = dataset.rows - dataset.added_rows if dataset.added_files else 0
    with tempfile.TemporaryDirectory(prefix="gx-docs-") as docs_dir:
        audit = audit_files(store, spec, new, earlier, earlier_rows=earlier_rows, earlier_labels=None,
                            label=version_label(dataset), docs_dir=docs_dir)
        docs_key = copy_docs(store, docs_dir, docs_prefix(dataset))
    return make_report(spec, dataset.dataset, dataset.id, audit.success, audit.evaluated, audit.failed, docs_key)


@task(name="validate-dataset", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error,
      tags=["lifecycle", "validate"])
def validate_task(store: ObjectStore, spec: DatasetSpec, dataset: DatasetVersion) -> ValidationReport:
    """Prefect wrapper: the report ingest's audit made, else a fresh run; a failing suite is a result."""
    return stored_report(store, spec, dataset) or run_validation(store, spec, dataset)
