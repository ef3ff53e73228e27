"""Validate: the quality gate between ingest and every stage that learns from or serves the data.

Why this shape:
- The suite is built from the spec alone (`build_suite`), so the same spec always checks the same
  things and the spec's `expectations` section is part of the report's cache key.
- Great Expectations runs in an ephemeral context (nothing written to the working directory); its
  Data Docs are rendered into a temp folder and copied into the store next to the dataset's other
  artefacts, so the evidence lives wherever the data lives (file lake or S3).
- A failing report is still a record: it is the quarantine mark. Later stages call
  `require_passed` and refuse the version, instead of each re-deciding what "valid" means.
- The suite runs on batches of new rows (tasks/audit.py): ingest audits a landing's new files before
  committing them, and checks that span files (ids unique against the table, row count, label set)
  read only the id column and the commit metadata. Memory is bounded by a batch, not the table.

Great Expectations is imported inside functions: it costs ~4 s to import.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pandas as pd

from infra_blocks import ObjectStore
from lifecycle.errors import QuarantinedError
from lifecycle.records import DatasetVersion, FailedExpectation, ValidationReport, code_version, stable_hash
from lifecycle.spec import DatasetSpec, Task
from tasks.gx_speedups import SPEEDUPS, gx_speedups
from tasks.validation_report import describe_failure as describe_failure  # re-exported (flows, tests)
from tasks.validation_report import failure_line as failure_line
from tasks.validation_report import report_markdown as report_markdown
from tasks.validation_report import summarize

if TYPE_CHECKING:
    import pyarrow as pa
    from great_expectations import ExpectationSuite
    from great_expectations.expectations import Expectation

# Spec sections the suite is built from: editing any of them re-validates.
SPEC_SECTIONS = (
    "expectations", "id_column", "label_column", "numeric_features", "categorical_features", "text_column", "task",
)
# Pandas dtypes accepted as "numeric" (numpy names, nullable extension dtypes by class name, bool).
NUMERIC_TYPES = [
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float32", "float64", "bool",
    "Int8Dtype", "Int16Dtype", "Int32Dtype", "Int64Dtype", "UInt8Dtype", "UInt16Dtype", "UInt32Dtype",
    "UInt64Dtype", "Float32Dtype", "Float64Dtype", "BooleanDtype",
]
# pandas 3 strings are dtype `str`; for object columns GX checks each value's Python type instead.
STRING_TYPE = "str"
# Data Docs assets not worth copying per version (animated help gifs, webfonts: ~3.9 MB of ~4 MB).
SKIPPED_ASSETS = (".gif", ".otf")


def version_label(dataset: DatasetVersion) -> str:
    return f"{dataset.dataset}@{dataset.id}"


def docs_prefix(dataset: DatasetVersion) -> str:
    return f"validation/{dataset.dataset}/{dataset.id}/docs"


def report_id(spec: DatasetSpec, dataset: DatasetVersion) -> str:
    """The ValidationReport id: same data, same suite, same code → same report (the stage is skipped)."""
    return report_id_for(spec, dataset.id)


def report_id_for(spec: DatasetSpec, version: str) -> str:
    return stable_hash(version, spec.section_hash(*SPEC_SECTIONS), code_version(sys.modules[__name__]))


def build_expectations(spec: DatasetSpec) -> list[Expectation]:
    """The expectations the spec implies, in a stable order (pure: no context, no data).

    Schema first (columns exist, numeric features numeric, text/categoricals strings), then the id
    (non-null, unique), the label (non-null, allowed set, at least two classes for classification;
    exactly two for binary), ranges, nulls and the row count.
    """
    import great_expectations.expectations as gxe

    exp = spec.expectations
    out: list[Expectation] = [gxe.ExpectColumnToExist(column=c) for c in spec.required_columns]
    string_cols = [*spec.categorical_features, *([spec.text_column] if spec.text_column else [])]
    numeric_cols = list(spec.numeric_features)
    if spec.task is Task.regression:
        numeric_cols.insert(0, spec.label_column)
    else:
        string_cols.insert(0, spec.label_column)
    out += [gxe.ExpectColumnValuesToBeInTypeList(column=c, type_list=NUMERIC_TYPES) for c in numeric_cols]
    out += [gxe.ExpectColumnValuesToBeOfType(column=c, type_=STRING_TYPE) for c in string_cols]

    strict = list(dict.fromkeys([spec.id_column, spec.label_column, *exp.not_null]))
    out += [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in strict]
    out.append(gxe.ExpectColumnValuesToBeUnique(column=spec.id_column))
    if spec.task is not Task.regression:
        if exp.allowed_labels:
            out.append(gxe.ExpectColumnValuesToBeInSet(column=spec.label_column, value_set=list(exp.allowed_labels)))
        # GX has this one built in: the number of distinct labels (nulls excluded).
        out.append(gxe.ExpectColumnUniqueValueCountToBeBetween(
            column=spec.label_column, min_value=2, max_value=2 if spec.task is Task.binary else None))

    for col, bounds in exp.ranges.items():
        if bounds.min is not None or bounds.max is not None:
            out.append(gxe.ExpectColumnValuesToBeBetween(column=col, min_value=bounds.min, max_value=bounds.max))

    if exp.max_null_fraction < 1:
        text = [spec.text_column] if spec.text_column else []
        features = [*spec.numeric_features, *spec.categorical_features, *text]
        mostly = round(1.0 - exp.max_null_fraction, 12)
        out += [gxe.ExpectColumnValuesToNotBeNull(column=c, mostly=mostly) for c in features if c not in strict]
    out.append(gxe.ExpectTableRowCountToBeBetween(min_value=exp.min_rows, max_value=exp.max_rows))
    return out


def build_suite(spec: DatasetSpec) -> ExpectationSuite:
    """The GX suite for a spec, named after the dataset (unattached to any context)."""
    import great_expectations as gx

    return gx.ExpectationSuite(name=spec.name, expectations=build_expectations(spec))


# Expectations that read a column's dtype and null pattern only, never its values.
SHAPE_ONLY = frozenset({"expect_column_to_exist", "expect_column_values_to_be_of_type",
                        "expect_column_values_to_be_in_type_list", "expect_column_values_to_not_be_null"})


def shape_only_view(frame: pd.DataFrame, expectations: list[Expectation]) -> pd.DataFrame:
    """The frame GX is given: string columns that no expectation reads the values of become their null
    pattern (empty strings where there is a value, nulls where there is none, same dtype).

    Why: GX's map checks filter their frame by the column's nulls (`df[df[col].notnull()]`), copying
    the column's values each time, and a free-text column is most of a frame's bytes. A column checked
    only for existence, type and nulls gives the same results, counts and Data Docs from its null
    pattern, which costs ~0.2 s per 10M rows to build and next to nothing to copy.
    """
    reads_values = {getattr(e, "column", None) for e in expectations if e.expectation_type not in SHAPE_ONLY}
    light = [c for c in frame.columns if c not in reads_values and isinstance(frame[c].dtype, pd.StringDtype)]
    if not light:
        return frame
    return frame.assign(**{c: null_pattern(frame[c]) for c in light})


def null_pattern(column: pd.Series) -> pd.Series:
    """Empty strings where a string column has a value, nulls where it has none; same dtype and index.

    Arrow-backed columns (pandas' `str`) get it from their own validity bitmaps and one zeroed offsets
    buffer, no per-row work: building it value by value cost 0.2 s per column at 10M rows.
    """
    if getattr(column.dtype, "storage", None) != "pyarrow":
        return pd.Series("", index=column.index, dtype=column.dtype).where(column.notna())
    import numpy as np
    import pyarrow as pa

    def empty(chunk: pa.Array) -> pa.Array:
        validity, offset = chunk.buffers()[0], chunk.offset
        if validity is None:
            offset = 0
        elif offset:  # a slice deep into its buffers: a bitmap of its own, not offsets for all before it
            validity, offset = chunk.is_valid().buffers()[1], 0
        width = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
        offsets = pa.py_buffer(np.zeros(offset + len(chunk) + 1, dtype=width))
        return pa.Array.from_buffers(chunk.type, len(chunk), [validity, offsets, pa.py_buffer(b"")],
                                     null_count=chunk.null_count, offset=offset)

    arrow = column.array.__arrow_array__()
    chunks = arrow.chunks if isinstance(arrow, pa.ChunkedArray) else [arrow]
    pattern = pa.chunked_array([empty(c) for c in chunks], type=arrow.type)
    return pd.Series(type(column.array)(pattern), index=column.index, dtype=column.dtype, name=column.name)


# What validate_frame does to keep GX fast; none changes a result (tests/tasks/test_gx_speedups.py).
ALL_SPEEDUPS = ("shape_only", *SPEEDUPS)
# Counts, percentages and up to 20 example values: all that `describe_failure` and Data Docs read. No
# unexpected rows or index columns (the `narrow` speedup relies on that); no pandas query string of every
# unexpected row either (nothing reads it, and building it filtered each checked column once more).
RESULT_FORMAT = {"result_format": "SUMMARY", "partial_unexpected_count": 20, "return_unexpected_index_query": False}


class SuiteRuns:
    """One ephemeral GX context, suite and checkpoint for several runs of one suite (an audit's
    batches); Data Docs are rendered once, by `finish`, into `docs_dir`.

    Why: a GX run costs ~0.45 s here whatever its size, of which building the context, suite and
    checkpoint is ~0.06 s and rendering Data Docs ~0.09 s; an audit of five batches paid both five
    times. What each run checks and reports is unchanged (the checkpoint is run with each frame).
    """

    def __init__(self, spec: DatasetSpec, docs_dir: str, name: str,
                 expectations: list[Expectation] | None = None) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        site = {"class_name": "SiteBuilder", "show_how_to_buttons": False,
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": docs_dir},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}}
        config = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(), analytics_enabled=False,
                                   progress_bars=ProgressBarsConfig(globally=False),
                                   data_docs_sites={"lifecycle": site})
        self.context = gx.get_context(mode="ephemeral", project_config=config)
        batch = (self.context.data_sources.add_pandas(spec.name).add_dataframe_asset(name.replace("@", "-"))
                 .add_batch_definition_whole_dataframe("all-rows"))
        self.suite = self.context.suites.add(gx.ExpectationSuite(name=spec.name, expectations=expectations)
                                             if expectations is not None else build_suite(spec))
        definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=self.suite))
        self.checkpoint = self.context.checkpoints.add(gx.Checkpoint(
            name=f"{spec.name}-gate", validation_definitions=[definition], actions=[], result_format=RESULT_FORMAT))

    def run(self, frame: pd.DataFrame, run_name: str,
            speedups: Collection[str] = ALL_SPEEDUPS) -> tuple[bool, int, list[FailedExpectation]]:
        """(success, number of expectations evaluated, failed expectations) of the suite on `frame`.

        `speedups` names the fixes to apply: `shape_only` (`shape_only_view`) and those of
        `tasks.gx_speedups`. All by default; the validate benchmark turns them off to measure each.
        """
        from great_expectations.core.run_identifier import RunIdentifier

        view = shape_only_view(frame, self.suite.expectations) if "shape_only" in speedups else frame
        with gx_speedups([n for n in speedups if n in SPEEDUPS]):
            result = self.checkpoint.run(batch_parameters={"dataframe": view},
                                         run_id=RunIdentifier(run_name=run_name))
        (suite_result,) = result.run_results.values()
        rank = {e.id: i for i, e in enumerate(self.suite.expectations)}  # report in suite order, not GX's
        ordered = sorted(suite_result.results,
                         key=lambda r: rank.get(r.expectation_config.id if r.expectation_config else None, len(rank)))
        evaluated = int(suite_result.statistics.get("evaluated_expectations", len(suite_result.results)))
        return bool(result.success), evaluated, summarize(ordered)

    def finish(self, speedups: Collection[str] = ALL_SPEEDUPS) -> None:
        """Render the Data Docs of every run so far (pages added to what `docs_dir` holds)."""
        with gx_speedups([n for n in speedups if n in SPEEDUPS]):
            self.context.build_data_docs(site_names=["lifecycle"])


def validate_frame(frame: pd.DataFrame, spec: DatasetSpec, run_name: str, docs_dir: str,
                   speedups: Collection[str] = ALL_SPEEDUPS,
                   expectations: list[Expectation] | None = None) -> tuple[bool, int, list[FailedExpectation]]:
    """Run the spec's suite (or `expectations`) on a frame in a context of its own (`SuiteRuns`); Data
    Docs go to `docs_dir`, where several runs add their pages to one site.

    Returns:
        (success, number of expectations evaluated, failed expectations).
    """
    runs = SuiteRuns(spec, docs_dir, run_name, expectations)
    verdict = runs.run(frame, run_name, speedups)
    runs.finish(speedups)
    return verdict


DOCS_UPLOADS = 8  # Data Docs pages uploaded at once: one PUT each, ~10 per landing


def copy_docs(store: ObjectStore, docs_dir: str, prefix: str) -> str:
    """Copy a rendered Data Docs site into the store under `prefix`; returns the index page's key.

    The pages go up in parallel: one after another they were 0.08 s of a 1 % append's 0.64 s on a
    local S3 endpoint, and each PUT to a remote store costs a round trip.
    """
    store.delete(prefix)
    pages = [os.path.join(root, name) for root, _dirs, files in os.walk(docs_dir) for name in files
             if not name.endswith(SKIPPED_ASSETS)]

    def upload(path: str) -> None:
        rel = os.path.relpath(path, docs_dir).replace(os.sep, "/")
        with open(path, "rb") as f:
            store.write_bytes(f"{prefix}/{rel}", f.read())

    with ThreadPoolExecutor(max_workers=DOCS_UPLOADS) as pool:
        list(pool.map(upload, pages))  # list(): the first failed upload raises here
    return f"{prefix}/index.html"


def read_file_table(store: ObjectStore, key: str) -> pa.Table:
    """One Parquet file of the store as an Arrow table."""
    import pyarrow.parquet as pq

    return pq.read_table(store.path(key), filesystem=store.pyarrow_filesystem())


def to_frame(table: pa.Table) -> pd.DataFrame:
    """An Arrow table as the DataFrame GX validates; integer columns stay integers (nullable) when they
    hold nulls, so a report shows id `51`, not `51.0`.

    The table's buffers are released column by column as they are converted (`self_destruct`), so a
    batch costs about its own size once, not twice: the caller must hold no other reference to it.
    """
    import pyarrow as pa

    nullable = {pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(), pa.int32(): pd.Int32Dtype(),
                pa.int64(): pd.Int64Dtype()}
    return table.to_pandas(types_mapper=nullable.get, self_destruct=True, split_blocks=True)


def read_file_frame(store: ObjectStore, key: str) -> pd.DataFrame:
    """One Parquet file as a DataFrame (`to_frame`)."""
    return to_frame(read_file_table(store, key))


def make_report(spec: DatasetSpec, dataset: str, version: str, success: bool, evaluated: int,
                failed: list[FailedExpectation], docs_key: str | None) -> ValidationReport:
    """The ValidationReport of one verdict (an audited landing or a table version)."""
    return ValidationReport(
        id=report_id_for(spec, version), dataset=dataset, code_version=code_version(sys.modules[__name__]),
        inputs={"dataset": version}, dataset_version=version, success=success and not failed, evaluated=evaluated,
        failed=failed, docs_key=docs_key,
    )


def audit_key(dataset: DatasetVersion) -> str:
    """Where ingest keeps the report its audit produced for a committed version (the validate stage
    publishes it)."""
    return f"validation/{dataset.dataset}/{dataset.id}/report.json"


def stored_report(store: ObjectStore, spec: DatasetSpec, dataset: DatasetVersion) -> ValidationReport | None:
    """The audit's report for this version and suite, when ingest made one."""
    key = audit_key(dataset)
    if not store.exists(key):
        return None
    report = ValidationReport.model_validate_json(store.read_bytes(key))
    return report if report.id == report_id(spec, dataset) else None


def require_passed(report: ValidationReport, dataset: DatasetVersion) -> None:
    """Refuse a dataset version that has no passing validation report.

    Raises:
        QuarantinedError: the report failed, or it is about another version.
    """
    label = version_label(dataset)
    if report.dataset_version != dataset.id or report.dataset != dataset.dataset:
        raise QuarantinedError(
            f"dataset {label} is quarantined: validation report {report.id} is for "
            f"{report.dataset}@{report.dataset_version}, not this version"
        )
    if not report.success:
        names = ", ".join(f"{f.expectation}({f.column})" if f.column else f.expectation for f in report.failed)
        raise QuarantinedError(f"dataset {label} is quarantined: validation failed ({names or 'no details'})")
