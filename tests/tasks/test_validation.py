"""The validation gate on real data: the sample passes, injected bad rows are each named, Data Docs land
in the store, and quarantined versions are refused."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lifecycle.errors import QuarantinedError
from lifecycle.records import DatasetVersion, stable_hash
from lifecycle.sample import SAMPLE_SPEC, generate_tickets
from lifecycle.spec import DatasetSpec, parse_spec
from tasks.audit import run_validation
from tasks.validation import build_expectations, build_suite, report_id, require_passed

BAD_ROW_FAILURES = {
    ("expect_column_values_to_be_between", "sentiment"),
    ("expect_column_values_to_not_be_null", "ticket_id"),
    ("expect_column_values_to_be_unique", "ticket_id"),
    ("expect_column_values_to_be_in_set", "category"),
}


def spec_of(**changes) -> DatasetSpec:
    return parse_spec({**SAMPLE_SPEC, "source": "tickets.csv", **changes})


def bad_tickets(rows: int = 600) -> pd.DataFrame:
    """The sample with each kind of bad row injected: 3 out of range, a null id, a duplicate id, a stray label."""
    frame = generate_tickets(rows)
    frame["ticket_id"] = frame["ticket_id"].astype("Int64")
    frame.loc[[10, 20, 30], "sentiment"] = [5.0, -3.5, 7.25]
    frame.loc[40, "ticket_id"] = pd.NA
    frame.loc[51, "ticket_id"] = frame.loc[50, "ticket_id"]
    frame.loc[60, "category"] = "spam"
    return frame


def ingest_frame(store, sample_files: tuple[Path, Path], frame: pd.DataFrame) -> tuple[DatasetSpec, DatasetVersion]:
    """Overwrite the sample CSV with `frame` and ingest it for real."""
    from lifecycle.spec import load_spec
    from tasks.ingest import ingest_dataset

    csv_path, spec_path = sample_files
    frame.to_csv(csv_path, index=False)
    spec = load_spec(spec_path)
    return spec, ingest_dataset(store, spec)


def write_version(store, frame: pd.DataFrame, name: str = "tickets") -> DatasetVersion:
    """A version written directly (bypassing ingest, which itself refuses some bad inputs)."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    version = stable_hash(frame.to_json())
    key = f"datasets/{name}/{version}/part-00000.parquet"
    store.filesystem().makedirs(store.path(f"datasets/{name}/{version}"), exist_ok=True)
    pq.write_table(table, store.path(key), filesystem=store.pyarrow_filesystem())
    return DatasetVersion(id=version, dataset=name, source="test", path=f"datasets/{name}/{version}", parts=[key],
                          rows=len(frame), bytes=0, schema={f.name: str(f.type) for f in table.schema}, spec_hash="")


def kinds(expectations) -> list[tuple[str, str | None]]:
    return [(e.expectation_type, getattr(e, "column", None)) for e in expectations]


def test_suite_from_spec_covers_schema_ids_labels_ranges_nulls_and_rows():
    spec = spec_of()
    exps = build_expectations(spec)
    by_kind = {(e.expectation_type, getattr(e, "column", None)): e for e in exps}
    for col in spec.required_columns:
        assert ("expect_column_to_exist", col) in by_kind
    for col in spec.numeric_features:
        assert "float64" in by_kind[("expect_column_values_to_be_in_type_list", col)].type_list
    for col in ["category", "channel", "plan", "text"]:
        assert by_kind[("expect_column_values_to_be_of_type", col)].type_ == "str"
    assert by_kind[("expect_column_values_to_not_be_null", "ticket_id")].mostly == 1
    assert by_kind[("expect_column_values_to_not_be_null", "category")].mostly == 1
    assert by_kind[("expect_column_values_to_not_be_null", "sentiment")].mostly == pytest.approx(0.95)
    assert ("expect_column_values_to_be_unique", "ticket_id") in by_kind
    allowed = set(SAMPLE_SPEC["expectations"]["allowed_labels"])
    assert set(by_kind[("expect_column_values_to_be_in_set", "category")].value_set) == allowed
    classes = by_kind[("expect_column_unique_value_count_to_be_between", "category")]
    assert (classes.min_value, classes.max_value) == (2, None)
    sentiment = by_kind[("expect_column_values_to_be_between", "sentiment")]
    assert (sentiment.min_value, sentiment.max_value) == (-1, 1)
    assert by_kind[("expect_column_values_to_be_between", "account_age_days")].max_value is None
    rows = by_kind[("expect_table_row_count_to_be_between", None)]
    assert (rows.min_value, rows.max_value) == (100, None)
    assert len(by_kind) == len(exps), "no expectation is added twice"
    assert kinds(build_suite(spec).expectations) == kinds(exps)


def test_suite_adapts_to_task_and_overrides():
    binary = build_expectations(spec_of(task="binary", expectations={"not_null": ["plan"], "max_null_fraction": 0.2}))
    by_kind = {(e.expectation_type, getattr(e, "column", None)): e for e in binary}
    assert by_kind[("expect_column_unique_value_count_to_be_between", "category")].max_value == 2
    assert ("expect_column_values_to_be_in_set", "category") not in by_kind  # no allowed_labels given
    assert by_kind[("expect_column_values_to_not_be_null", "plan")].mostly == 1  # strict wins over max_null_fraction
    assert by_kind[("expect_column_values_to_not_be_null", "channel")].mostly == pytest.approx(0.8)

    regression = build_expectations(spec_of(task="regression", label_column="sentiment",
                                            numeric_features=["account_age_days"], expectations={}))
    by_kind = {(e.expectation_type, getattr(e, "column", None)): e for e in regression}
    assert ("expect_column_values_to_be_in_type_list", "sentiment") in by_kind
    assert not any(k[0] == "expect_column_unique_value_count_to_be_between" for k in by_kind)


def test_sample_passes_and_data_docs_land_in_the_store(lake, sample_spec, dataset_version):
    report = run_validation(lake, sample_spec, dataset_version)

    assert report.success and report.failed == []
    assert report.evaluated == len(build_expectations(sample_spec))
    assert report.id == report_id(sample_spec, dataset_version)
    assert report.dataset_version == dataset_version.id and report.inputs == {"dataset": dataset_version.id}
    assert report.docs_key == f"validation/tickets/{dataset_version.id}/docs/index.html"
    index = lake.read_bytes(report.docs_key).decode()
    assert "<html" in index.lower() and "tickets" in index
    pages = [k for k in lake.list_keys(f"validation/tickets/{dataset_version.id}/docs") if "/validations/" in k]
    assert len(pages) == 1 and pages[0].endswith(".html")
    require_passed(report, dataset_version)


def test_bad_rows_name_each_failed_expectation(lake, sample_files):
    """Ingest's audit refuses the landing with the report; validating the same rows as a version (written
    directly) gives the same verdict, which quarantines it."""
    from tasks.ingest import LandingQuarantined

    with pytest.raises(LandingQuarantined) as refused:
        ingest_frame(lake, sample_files, bad_tickets())
    spec = parse_spec({**SAMPLE_SPEC, "source": str(sample_files[0])})
    assert lake.exists(refused.value.report.docs_key)
    dataset = write_version(lake, bad_tickets())
    report = run_validation(lake, spec, dataset)
    assert [(f.expectation, f.column, f.detail) for f in report.failed] == [
        (f.expectation, f.column, f.detail) for f in refused.value.report.failed]

    assert not report.success and report.quarantined
    assert {(f.expectation, f.column) for f in report.failed} == BAD_ROW_FAILURES
    detail = {f.column + ":" + f.expectation: f.detail for f in report.failed}
    assert detail["sentiment:expect_column_values_to_be_between"].startswith("3 rows unexpected (0.5%)")
    assert all(v in detail["sentiment:expect_column_values_to_be_between"] for v in ("5.0", "-3.5", "7.25"))
    assert detail["ticket_id:expect_column_values_to_not_be_null"].startswith("1 row unexpected")
    assert "'spam'" in detail["category:expect_column_values_to_be_in_set"]
    assert detail["ticket_id:expect_column_values_to_be_unique"].endswith("e.g. 51")  # ids stay integers
    assert lake.exists(report.docs_key)
    with pytest.raises(QuarantinedError, match=rf"dataset tickets@{dataset.id} is quarantined: validation failed "
                                               r"\(.*expect_column_values_to_be_between\(sentiment\)"):
        require_passed(report, dataset)


def test_single_class_label_fails(lake):
    frame = generate_tickets(200)
    frame["category"] = "billing"
    spec = spec_of()
    report = run_validation(lake, spec, write_version(lake, frame))

    assert [(f.expectation, f.column, f.detail) for f in report.failed] == [
        ("expect_column_unique_value_count_to_be_between", "category",
         "observed 1 (expected >= 2): label column 'category' has one class (billing); multiclass needs two or more")]


def test_missing_column_and_too_few_rows_reported_once(lake):
    frame = generate_tickets(50).drop(columns=["plan"])
    report = run_validation(lake, spec_of(), write_version(lake, frame))

    assert [(f.expectation, f.column) for f in report.failed] == [
        ("expect_column_to_exist", "plan"), ("expect_table_row_count_to_be_between", None)]
    assert report.failed[0].detail == "column not found"
    assert report.failed[1].detail == "observed 50 (expected >= 100)"


def test_report_for_another_version_is_refused(lake, sample_spec, dataset_version):
    report = run_validation(lake, sample_spec, dataset_version)
    other = dataset_version.model_copy(update={"id": "0" * 16})
    quarantined = rf"tickets@{'0' * 16} is quarantined: .* is for tickets@{dataset_version.id}"
    with pytest.raises(QuarantinedError, match=quarantined):
        require_passed(report, other)


def test_gx_gets_only_the_null_pattern_of_columns_whose_values_no_expectation_reads(tmp_path):
    """The text column (exist, type, not-null checks only) reaches GX as its null pattern; the verdict and
    every failure detail are those of the full frame."""
    import numpy as np

    from tasks.validation import shape_only_view, validate_frame

    spec = spec_of(expectations={**SAMPLE_SPEC["expectations"], "max_null_fraction": 0.05})
    frame = generate_tickets(400, seed=5)
    frame["ticket_id"] = frame["ticket_id"].astype("Int64")
    for col in ("category", "channel", "plan", "text"):
        frame[col] = frame[col].astype("str")
    frame.loc[np.arange(0, 400, 10), "text"] = None  # 10 % nulls: fails not-null(text, mostly 0.95)
    frame.loc[3, "category"] = "spam"

    view = shape_only_view(frame, build_expectations(spec))
    assert (view["text"].isna() == frame["text"].isna()).all() and view["text"].dtype == frame["text"].dtype
    assert set(view["text"].dropna()) == {""}
    assert view["category"].equals(frame["category"])  # read by the allowed-labels check: untouched

    ok, evaluated, failed = validate_frame(frame, spec, "tickets@view", str(tmp_path / "docs"))
    assert not ok
    by_column = {(f.expectation, f.column): f.detail for f in failed}
    assert by_column[("expect_column_values_to_not_be_null", "text")].startswith("40 rows unexpected (10%")
    assert "'spam'" in by_column[("expect_column_values_to_be_in_set", "category")]


@pytest.mark.parametrize("dtype", ["str", "string", object])
def test_null_pattern_keeps_nulls_dtype_and_index_of_sliced_and_chunked_columns(dtype):
    from tasks.validation import null_pattern

    values = pd.Series(["a", None, "bb", "ccc", None, "d"] * 4, dtype=dtype)
    no_nulls = pd.Series(["x", "yy", "zzz"] * 3, dtype=dtype)
    for column in (values, values.iloc[3:17], pd.concat([values, values.iloc[5:]]), no_nulls.iloc[2:]):
        pattern = null_pattern(column)
        assert pattern.dtype == column.dtype and pattern.index.equals(column.index)
        assert pattern.isna().tolist() == column.isna().tolist()
        assert set(pattern.dropna()) <= {""}


def write_parts(store, frames: list[pd.DataFrame], name: str = "tickets") -> list[str]:
    """Each frame as one Parquet file of a folder; returns their keys in order."""
    folder = f"datasets/{name}/parts-{stable_hash(str(len(frames)))}"
    store.filesystem().makedirs(store.path(folder), exist_ok=True)
    keys = []
    for i, frame in enumerate(frames):
        key = f"{folder}/part-{i:05d}.parquet"
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), store.path(key),
                       filesystem=store.pyarrow_filesystem())
        keys.append(key)
    return keys


def test_audit_batches_whole_files_up_to_the_budget_and_a_new_schema(lake):
    """Files are grouped into GX runs by Arrow bytes, in order and whole; a file with another schema
    (a nullable column added) starts a batch of its own."""
    from tasks.audit import _batches

    frames = [generate_tickets(300).assign(ticket_id=lambda f, i=i: f["ticket_id"] + 1000 * i) for i in range(3)]
    frames.append(frames[0].assign(ticket_id=frames[0]["ticket_id"] + 5000, extra=1.0))
    keys = write_parts(lake, frames)
    one = pq.read_table(lake.path(keys[0]), filesystem=lake.pyarrow_filesystem()).nbytes

    assert [b.num_rows for b in _batches(lake, keys, 1 << 30)] == [900, 300]
    assert [b.num_rows for b in _batches(lake, keys, 2 * one + 1)] == [600, 300, 300]
    assert [b.num_rows for b in _batches(lake, keys, 1)] == [300, 300, 300, 300]


def test_audit_verdict_is_the_same_in_one_batch_or_one_per_file(lake, tmp_path):
    """The same failures (expectation and column) whatever the batch size; failures found in several
    batches are one entry that says how many more batches had them."""
    from tasks.audit import audit_files

    frames = [generate_tickets(300).assign(ticket_id=lambda f, i=i: f["ticket_id"].astype("Int64") + 1000 * i)
              for i in range(3)]
    frames[0].loc[5, "sentiment"] = 9.0
    frames[2].loc[7, "sentiment"] = -9.0
    frames[1].loc[3, "category"] = "spam"
    frames[2].loc[8, "ticket_id"] = frames[0].loc[1, "ticket_id"]  # a duplicate across files
    keys = write_parts(lake, frames)
    spec = spec_of()
    verdicts = {}
    for budget in (1, 1 << 30):
        docs = tmp_path / f"docs-{budget}"
        audit = audit_files(lake, spec, keys, [], earlier_rows=0, earlier_labels=None, label="tickets@t",
                            docs_dir=str(docs), batch_bytes=budget)
        verdicts[budget] = audit
        assert not audit.success and audit.rows == 900
    per_file, whole = ({(f.expectation, f.column): f.detail for f in verdicts[b].failed} for b in (1, 1 << 30))
    assert per_file.keys() == whole.keys() == {
        ("expect_column_values_to_be_between", "sentiment"), ("expect_column_values_to_be_in_set", "category"),
        ("expect_column_values_to_be_unique", "ticket_id")}
    assert per_file[("expect_column_values_to_be_between", "sentiment")].endswith("and in 1 more batch(es) of files")
    assert whole[("expect_column_values_to_be_between", "sentiment")].startswith("2 rows unexpected")
