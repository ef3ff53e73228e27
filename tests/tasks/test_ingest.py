"""Ingest: versioning by content, formats, and one-line errors that leave nothing visible."""

from __future__ import annotations

import gzip
from pathlib import Path

import pandas as pd
import pytest

from lifecycle.errors import LifecycleError
from lifecycle.sample import generate_tickets
from tasks.ingest import ingest_dataset, read_dataset


def _versions(lake, name="tickets") -> list[str]:
    return [k for k in lake.list_keys(f"datasets/{name}") if k.endswith("manifest.json")]


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
    assert _versions(lake) == [f"datasets/tickets/{first.id}/manifest.json"]
    back = read_dataset(lake, first)
    assert list(back.columns) == sample_spec.required_columns
    assert back["ticket_id"].tolist() == frame["ticket_id"].tolist()


def test_changed_content_new_version(lake, sample_spec, tmp_path):
    first = ingest_dataset(lake, sample_spec)
    path = tmp_path / "more.csv"
    generate_tickets(601).to_csv(path, index=False)
    second = ingest_dataset(lake, sample_spec.model_copy(update={"source": str(path)}))
    assert second.id != first.id
    assert len(_versions(lake)) == 2


def test_folder_and_gzip_sources(lake, sample_spec, sample_files, tmp_path):
    folder = tmp_path / "landing"
    folder.mkdir()
    frame = pd.read_csv(sample_files[0])
    frame.iloc[:300].to_csv(folder / "a.csv", index=False)
    with gzip.open(folder / "b.csv.gz", "wt") as f:
        frame.iloc[300:].to_csv(f, index=False)
    whole = ingest_dataset(lake, sample_spec)
    parts = ingest_dataset(lake, sample_spec.model_copy(update={"source": str(folder)}))
    assert parts.id == whole.id


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
        ("missing.csv", GOOD_HEADER.replace(b",plan", b"") + b"1,x,email,10,1,2.5,0.1,billing\n", "missing column(s) plan"),
        ("latin1.csv", GOOD_HEADER + ROW + "3,caf\xe9,chat,free,1,1,1,0.1,billing\n".encode("latin-1"), "invalid UTF8"),
        ("truncated.csv.gz", gzip.compress(GOOD_HEADER + ROW * 2000)[:300], "truncated"),
        ("oneclass.csv", GOOD_HEADER + ROW.replace(b"technical", b"billing"), "has one class (billing)"),
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
    assert not [k for k in lake.list_keys("datasets") if "_staging" in k]


def test_missing_file_and_dotdot(lake, sample_spec, tmp_path):
    with pytest.raises(LifecycleError, match="no such file"):
        ingest_dataset(lake, sample_spec.model_copy(update={"source": str(tmp_path / "nope.csv")}))
    with pytest.raises(LifecycleError, match=r"may not contain '\.\.'"):
        ingest_dataset(lake, sample_spec.model_copy(update={"source": f"{tmp_path}/../x.csv"}))


def test_leftovers_of_a_failed_run_are_removed(lake, sample_spec):
    lake.write_bytes("datasets/tickets/deadbeef/part-00000.parquet", b"partial")
    lake.write_bytes("datasets/tickets/_staging/abc/part-00000.parquet", b"partial")
    version = ingest_dataset(lake, sample_spec)
    assert lake.list_keys("datasets/tickets") == sorted(
        [f"datasets/tickets/{version.id}/manifest.json", f"datasets/tickets/{version.id}/part-00000.parquet"]
    )
