"""Ingest: versioning by content, formats, and one-line errors that leave nothing visible (the Delta
table side: tests/tasks/test_lake.py)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import tasks.ingest
import tasks.sources
from lifecycle.errors import LifecycleError
from lifecycle.sample import generate_tickets
from tasks.ingest import LandingQuarantined, ingest_dataset
from tasks.lake import read_dataset, table_state
from tasks.records import save_record


def _versions(lake, name="tickets") -> list[int]:
    """The table's committed versions (none without a table)."""
    state = table_state(lake, name)
    return [c.version for c in state.commits] if state else []


def test_same_content_same_version_any_format(lake, sample_spec, sample_files, tmp_path):
    first = ingest_dataset(lake, sample_spec)
    again = ingest_dataset(lake, sample_spec)
    frame = pd.read_csv(sample_files[0])
    frame.to_parquet(tmp_path / "t.parquet")
    frame.to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    as_parquet = ingest_dataset(lake, sample_spec.model_copy(update={"source": str(tmp_path / "t.parquet")}))
    as_jsonl = ingest_dataset(lake, sample_spec.model_copy(update={"source": str(tmp_path / "t.jsonl")}))
    assert first.id == again.id == as_parquet.id == as_jsonl.id
    assert first.rows == 600
    assert _versions(lake) == [0] and first.table_version == again.table_version == 0
    back = read_dataset(lake, first)
    assert list(back.columns) == sample_spec.required_columns
    assert back["ticket_id"].tolist() == frame["ticket_id"].tolist()
    # Once published, a repeat returns the published record itself: its time is how a run shows `cached`.
    save_record(lake, first)
    assert ingest_dataset(lake, sample_spec).created_at == first.created_at


def test_changed_content_new_version(lake, sample_spec, tmp_path):
    first = ingest_dataset(lake, sample_spec)
    path = tmp_path / "more.csv"
    generate_tickets(601).to_csv(path, index=False)
    replace = sample_spec.ingest.model_copy(update={"mode": "replace"})  # append would refuse the repeated ids
    second = ingest_dataset(lake, sample_spec.model_copy(update={"source": str(path), "ingest": replace}))
    assert second.id != first.id and second.rows == 601
    assert _versions(lake) == [0, 1]


def test_folder_and_gzip_sources(lake, sample_spec, sample_files, tmp_path):
    folder = tmp_path / "landing"
    folder.mkdir()
    frame = pd.read_csv(sample_files[0])
    frame.iloc[:300].to_csv(folder / "a.csv", index=False)
    with gzip.open(folder / "b.csv.gz", "wt") as f:
        frame.iloc[300:].to_csv(f, index=False)
    whole = ingest_dataset(lake, sample_spec)
    parts = ingest_dataset(lake, sample_spec.model_copy(update={"source": str(folder)}))
    assert parts.id == whole.id and _versions(lake) == [0]  # the same rows: no second commit


def test_version_does_not_depend_on_batches_or_parts(lake, sample_spec, monkeypatch):
    whole = ingest_dataset(lake, sample_spec)
    rows = read_dataset(lake, whole)
    monkeypatch.setattr(tasks.sources, "BLOCK_BYTES", 4 << 10)  # ~40 rows a batch
    monkeypatch.setattr(tasks.ingest, "ROWS_PER_PART", 100)
    lake.delete("datasets")
    small = ingest_dataset(lake, sample_spec)
    assert small.id == whole.id
    assert len(small.parts) == 6 and len(whole.parts) == 1
    assert read_dataset(lake, small).equals(rows)


def test_audit_checks_rows_as_written_in_batches_and_a_repeat_runs_no_gx(lake, sample_spec, monkeypatch):
    """The audit's GX runs get the rows ingest wrote, from memory, in batches of the budget (never read
    back from the store), in one GX context; a repeat of rows the table has already, within one batch,
    costs no GX run (the last batch is checked after the repeat check)."""
    import tasks.audit
    import tasks.validation

    runs: list[int] = []
    real_run = tasks.validation.SuiteRuns.run

    def counted(self, frame, run_name, speedups=tasks.validation.ALL_SPEEDUPS):
        runs.append(len(frame))
        return real_run(self, frame, run_name, speedups)

    def no_read_back(*args, **kwargs):
        raise AssertionError("ingest read its new files back for the audit")

    monkeypatch.setattr(tasks.validation.SuiteRuns, "run", counted)
    monkeypatch.setattr(tasks.audit, "_batches", no_read_back)
    monkeypatch.setattr(tasks.sources, "BLOCK_BYTES", 4 << 10)  # ~40 rows a batch
    monkeypatch.setattr(tasks.ingest, "ROWS_PER_PART", 100)
    monkeypatch.setattr(tasks.audit, "AUDIT_BATCH_BYTES", 40_000)  # a few hundred sample rows
    contexts = []
    real_init = tasks.validation.SuiteRuns.__init__
    monkeypatch.setattr(tasks.validation.SuiteRuns, "__init__",
                        lambda self, *a, **k: (contexts.append(1), real_init(self, *a, **k))[1])

    version = ingest_dataset(lake, sample_spec)
    assert version.rows == 600 and sum(runs) == 600 and len(runs) >= 2, runs
    assert len(contexts) == 1
    report = tasks.validation.stored_report(lake, sample_spec, version)
    assert report is not None and report.success and lake.exists(report.docs_key)

    runs.clear()
    monkeypatch.setattr(tasks.audit, "AUDIT_BATCH_BYTES", 256 << 20)
    assert ingest_dataset(lake, sample_spec).id == version.id
    assert runs == []


def test_a_first_ingest_reads_nothing_back_for_ids_or_labels(lake, sample_spec, monkeypatch):
    """Files whose id ranges meet no other file's are not read back for the id check (a file's own ids
    are the GX suite's), and the label set comes from the checked rows, not from the files."""
    import tasks.audit

    def no_read_back(*args, **kwargs):
        raise AssertionError("the audit read a column of the new files back")

    monkeypatch.setattr(tasks.audit, "_column", no_read_back)
    monkeypatch.setattr(tasks.sources, "BLOCK_BYTES", 4 << 10)
    monkeypatch.setattr(tasks.ingest, "ROWS_PER_PART", 100)
    version = ingest_dataset(lake, sample_spec)
    assert version.rows == 600 and len(version.parts) == 6
    assert table_state(lake, "tickets").labels == set(pd.read_csv(sample_spec.source)["category"])


def test_ids_repeated_inside_one_file_are_found_whatever_the_gx_batches(lake, sample_spec, tmp_path, monkeypatch):
    """A GX batch ends only where a file ends, so two equal ids far apart in one file are in one run."""
    import tasks.audit

    frame = pd.read_csv(sample_spec.source)
    frame.loc[550, "ticket_id"] = frame.loc[5, "ticket_id"]
    path = tmp_path / "repeated.csv"
    frame.to_csv(path, index=False)
    monkeypatch.setattr(tasks.sources, "BLOCK_BYTES", 4 << 10)  # ~40 rows a batch: many pieces per file
    monkeypatch.setattr(tasks.audit, "AUDIT_BATCH_BYTES", 1)  # a GX run at every chance
    with pytest.raises(LandingQuarantined) as err:
        ingest_dataset(lake, sample_spec.model_copy(update={"source": str(path)}))
    assert "expect_column_values_to_be_unique" in str(err.value) and table_state(lake, "tickets") is None


def _bad(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


GOOD_HEADER = b"ticket_id,text,channel,plan,account_age_days,prior_tickets,response_minutes,sentiment,category\n"
ROW = b"1,refund please,email,pro,10,1,2.5,0.1,billing\n2,crash again,chat,free,20,0,3.5,-0.2,technical\n"


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("empty.csv", b"", "Empty CSV file"),
        ("header_only.csv", GOOD_HEADER, "empty file"),
        ("malformed.csv", GOOD_HEADER + ROW + b"3,x,chat,free,1,1,1,0.1,billing,EXTRA\n", "Expected 9 columns, got 10"),
        ("wrongtype.csv", GOOD_HEADER + ROW + b"3,x,chat,free,old,1,1,0.1,billing\n", "'account_age_days'"),
        ("missing.csv", GOOD_HEADER.replace(b",plan", b"") + b"1,x,email,10,1,2.5,0.1,billing\n",
         "missing column(s) plan"),
        ("latin1.csv", GOOD_HEADER + ROW + "3,caf\xe9,chat,free,1,1,1,0.1,billing\n".encode("latin-1"), "invalid UTF8"),
        ("truncated.csv.gz", gzip.compress(GOOD_HEADER + ROW * 2000)[:300], "truncated"),
    ],
)
def test_bad_input_one_line_error_nothing_visible(lake, sample_spec, tmp_path, name, data, expected):
    source = _bad(tmp_path, name, data)
    spec = sample_spec.model_copy(update={"source": source})
    with pytest.raises(LifecycleError) as err:
        ingest_dataset(lake, spec)
    message = str(err.value)
    assert expected in message
    assert name in message
    assert "\n" not in message
    assert _versions(lake) == []
    assert lake.list_keys("datasets") == []


def test_one_class_is_refused_by_the_audit(lake, sample_spec, tmp_path):
    source = _bad(tmp_path, "oneclass.csv", GOOD_HEADER + (ROW.replace(b"technical", b"billing")) * 60)
    with pytest.raises(LandingQuarantined) as err:
        ingest_dataset(lake, sample_spec.model_copy(update={"source": source}))
    assert "expect_column_unique_value_count_to_be_between(category) observed 1 (expected >= 2)" in str(err.value)
    assert _versions(lake) == [] and [k for k in lake.list_keys("datasets") if not k.endswith("/")] == []


S3_BAD = {
    "malformed.csv": (GOOD_HEADER + ROW + b"3,x,chat,free,1,1,1,0.1,billing,EXTRA\n", "Expected 9 columns, got 10"),
    "latin1.csv": (GOOD_HEADER + ROW + "3,caf\xe9,chat,free,1,1,1,0.1,billing\n".encode("latin-1"), "invalid UTF8"),
    "truncated.csv.gz": (gzip.compress(GOOD_HEADER + ROW * 2000)[:300], "truncated"),
}


@pytest.mark.parametrize("name", sorted(S3_BAD))
def test_bad_object_in_the_bucket_one_line_error_nothing_visible(s3_lake, sample_spec, name):
    data, expected = S3_BAD[name]
    s3_lake.write_bytes(f"landing/{name}", data)
    with pytest.raises(LifecycleError) as err:
        ingest_dataset(s3_lake, sample_spec.model_copy(update={"source": s3_lake.uri(f"landing/{name}")}))
    message = str(err.value)
    assert expected in message and name in message and "\n" not in message
    assert _versions(s3_lake) == []
    assert s3_lake.list_keys("datasets") == []


def test_s3_source_with_dotdot_is_refused(s3_lake, sample_spec, sample_files):
    s3_lake.write_bytes("landing/tickets.csv", sample_files[0].read_bytes())
    ok = ingest_dataset(s3_lake, sample_spec.model_copy(update={"source": s3_lake.uri("landing/tickets.csv")}))
    assert ok.id == ingest_dataset(s3_lake, sample_spec).id  # an S3 source reads like a local one
    escaping = s3_lake.uri("landing") + "/../landing/tickets.csv"
    with pytest.raises(LifecycleError, match=r"may not contain '\.\.'"):
        ingest_dataset(s3_lake, sample_spec.model_copy(update={"source": escaping}))
    assert _versions(s3_lake) == [0]


def test_missing_file_and_dotdot(lake, sample_spec, tmp_path):
    with pytest.raises(LifecycleError, match="no such file"):
        ingest_dataset(lake, sample_spec.model_copy(update={"source": str(tmp_path / "nope.csv")}))
    with pytest.raises(LifecycleError, match=r"may not contain '\.\.'"):
        ingest_dataset(lake, sample_spec.model_copy(update={"source": f"{tmp_path}/../x.csv"}))


PEAK = """
import json, sys
import tasks.audit as audit
import tasks.ingest as ingest
import tasks.sources as sources
from infra_blocks import ObjectStore
from lifecycle.sample import SAMPLE_SPEC
from lifecycle.spec import parse_spec
sources.BLOCK_BYTES, sources.GROUP_ROWS, ingest.ROWS_PER_PART = 128 << 10, 8192, 32768
audit.AUDIT_BATCH_BYTES = 4 << 20  # the audit holds one batch of files: small here, as the parts are
spec = parse_spec({**SAMPLE_SPEC, "source": sys.argv[1]})
version = ingest.ingest_dataset(ObjectStore(url="file://" + sys.argv[2]), spec)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"rows": version.rows, "peak_mb": int(hwm.split()[1]) / 1024}))
"""


def _tiled_csv(path: Path, rows: int) -> float:
    """`rows` sample tickets (20k generated, tiled with fresh ids) as CSV; returns its size in MB."""
    base = generate_tickets(20_000)
    rest = base.drop(columns=["ticket_id"]).to_csv(header=False, index=False).splitlines(keepends=True)
    with path.open("w") as f:
        f.write("ticket_id," + ",".join(base.columns.drop("ticket_id")) + "\n")
        for start in range(0, rows, len(rest)):
            f.write("".join(f"{start + i + 1},{line}" for i, line in enumerate(rest[: rows - start])))
    return path.stat().st_size / 1e6


@pytest.mark.slow
def test_ingest_memory_does_not_grow_with_the_file(tmp_path):
    """Peak RSS (VmHWM of a fresh process) is the same for a file 4x larger: ingest streams, and the
    audit holds one batch of files (`AUDIT_BATCH_BYTES`) at a time.

    Small blocks, parts and audit batches make the plateau show at CI-sized files; `python -m benchmarks.ingest
    --memory-mb 2048` measures the default settings on a 2 GB CSV. Arrow's readers keep up to 32 blocks
    in flight, so the default block size itself must stay small.
    """
    assert tasks.sources.BLOCK_BYTES * 32 <= 128 << 20
    peaks, sizes = {}, {}
    for rows in (200_000, 800_000):
        csv = tmp_path / f"t{rows}.csv"
        sizes[rows] = _tiled_csv(csv, rows)
        out = subprocess.run([sys.executable, "-c", PEAK, str(csv), str(tmp_path / f"lake{rows}")], check=True,
                             capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["rows"] == rows
        peaks[rows] = result["peak_mb"]
        csv.unlink()
    added = sizes[800_000] - sizes[200_000]  # ~56 MB more input
    # Holding the file (as Arrow or pandas) would grow the peak by more than the added bytes; streaming
    # leaves only allocator noise (measured 0-18 MB here), far below half of them.
    assert peaks[800_000] - peaks[200_000] < 0.5 * added, (sizes, peaks)
