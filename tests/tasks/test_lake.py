"""The lake as Delta Lake tables: appends and time travel, idempotent landings, replace, schema refusals,
concurrent writers in two processes, and the audit that keeps a bad landing out of the table.

Every test that touches S3 runs against moto in its own process (tests/fixtures/s3.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import tasks.ingest
import tasks.lake
from lifecycle.errors import LifecycleError
from lifecycle.sample import generate_tickets
from tasks.ingest import LandingQuarantined, app_id, ingest_dataset, read_dataset
from tasks.lake import state_after, table_state, table_uri, version_record
from tests.fixtures.s3 import S3_KEY, S3_SECRET

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["file", "s3"])
def store(request, lake):
    return lake if request.param == "file" else request.getfixturevalue("s3_lake")


def _land(store, name: str, frame: pd.DataFrame) -> str:
    """Put a CSV under the store's landing zone; returns its URI (what a landing's ingest reads)."""
    store.write_bytes(f"landing/tickets/{name}", frame.to_csv(index=False).encode())
    return store.uri(f"landing/tickets/{name}")


def _uncommitted(store, name: str = "tickets") -> list[str]:
    """Data files in the table location that the latest version does not reference."""
    state = table_state(store, name)
    live = set(state.keys()) if state else set()
    return [k for k in store.list_keys(f"datasets/{name}") if "/_delta_log/" not in k and k not in live]


def _second_reader(store, version: int) -> list[int]:
    """The ids of a table version as pyarrow.dataset reads it through delta-rs (no lifecycle code)."""
    from deltalake import DeltaTable

    table = DeltaTable(table_uri(store, "tickets"), version=version, storage_options=store.delta_storage_options())
    return sorted(table.to_pyarrow_dataset().to_table(columns=["ticket_id"]).column(0).to_pylist())


def test_appends_commit_and_every_version_reads_back(store, sample_spec):
    frames = [generate_tickets(1500).iloc[i * 500:(i + 1) * 500] for i in range(3)]
    records = [ingest_dataset(store, sample_spec.model_copy(update={"source": _land(store, f"{i}.csv", f)}))
               for i, f in enumerate(frames)]

    assert [r.table_version for r in records] == [0, 1, 2]
    assert [r.rows for r in records] == [500, 1000, 1500] and [r.added_rows for r in records] == [500] * 3
    assert len({r.id for r in records}) == 3
    for i, record in enumerate(records):
        expected = pd.concat(frames[: i + 1])["ticket_id"].tolist()
        assert read_dataset(store, record)["ticket_id"].tolist() == expected  # rows in commit order
        assert version_record(store, "tickets", i).model_dump(exclude={"created_at"}) == record.model_dump(
            exclude={"created_at"})  # the record is rebuilt from the Delta log alone
        assert _second_reader(store, i) == sorted(expected)
        assert record.added_files == record.parts[-1:] and record.content_hash.startswith(record.id)
    history = table_state(store, "tickets").table.history()
    assert [h["lifecycle.content_hash"][:16] for h in history] == [r.id for r in reversed(records)]
    assert _uncommitted(store) == []


def test_the_state_after_a_commit_is_read_incrementally_and_in_full_once_others_committed(lake, sample_spec,
                                                                                          monkeypatch):
    """What ingest returns after its commit comes from the new log entries alone (state_after), and is
    the state `table_state` reads from scratch; a table that moved on further is read in full."""
    frames = [generate_tickets(900).iloc[i * 300:(i + 1) * 300] for i in range(3)]

    def land(i: int) -> None:
        ingest_dataset(lake, sample_spec.model_copy(update={"source": _land(lake, f"{i}.csv", frames[i])}))

    def seen(state) -> tuple:
        return (state.version, state.files, state.sizes, state.counts, state.rows, state.content_hash,
                [(c.version, c.fields) for c in state.commits], state.schema)

    land(0)
    before = table_state(lake, "tickets")
    land(1)
    full_reads: list[tuple] = []
    monkeypatch.setattr(tasks.lake, "table_state", lambda *a: full_reads.append(a) or table_state(*a))
    assert seen(state_after(lake, before, 1)) == seen(table_state(lake, "tickets", 1))
    assert full_reads == []  # one commit past `before`: the new log entries only
    land(2)
    assert seen(state_after(lake, table_state(lake, "tickets", 0), 1)) == seen(table_state(lake, "tickets", 1))
    assert full_reads[-1] == (lake, "tickets", 1)  # two past: read in full, at the version asked for


def test_the_same_landing_twice_commits_once(store, sample_spec, monkeypatch):
    uri = _land(store, "a.csv", generate_tickets(300))
    spec = sample_spec.model_copy(update={"source": uri})
    first = ingest_dataset(store, spec)
    reads = []
    monkeypatch.setattr(tasks.ingest, "read_source", lambda *a: reads.append(a) or iter(()))
    again = ingest_dataset(store, spec)  # redelivered: recognised by object + ETag, not even read
    assert again.id == first.id and again.table_version == 0 and reads == []
    monkeypatch.undo()

    copy = _land(store, "copy-of-a.csv", generate_tickets(300))  # same rows under another name
    assert ingest_dataset(store, spec.model_copy(update={"source": copy})).table_version == 0
    state = table_state(store, "tickets")
    assert state.version == 0 and state.committed(app_id("rows", first.added_hash, 0))
    assert _uncommitted(store) == []


def test_replace_overwrites_and_the_same_content_has_the_same_id(lake, sample_spec, tmp_path):
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    generate_tickets(400).to_csv(one, index=False)
    generate_tickets(900).iloc[400:].to_csv(two, index=False)
    first = ingest_dataset(lake, sample_spec.model_copy(update={"source": str(one)}))
    spec_two = _spec_with(sample_spec, source=str(two), ingest={"mode": "replace"})
    second = ingest_dataset(lake, spec_two)
    assert (second.table_version, second.rows, second.parts) == (1, 500, second.added_files)
    assert read_dataset(lake, second)["ticket_id"].min() == 401
    assert read_dataset(lake, first)["ticket_id"].tolist() == list(range(1, 401))  # time travel
    assert ingest_dataset(lake, spec_two).table_version == 1  # the table holds exactly this: no-op
    back = ingest_dataset(lake, spec_two.model_copy(update={"source": str(one)}))
    assert back.table_version == 2 and back.id == first.id  # same table content, same id


def _spec_with(spec, **changes):
    from lifecycle.spec import parse_spec

    return parse_spec({**spec.model_dump(mode="json"), **changes})


def test_schema_changes_are_refused_naming_the_column_and_commit_nothing(lake, sample_spec, tmp_path):
    base = ingest_dataset(lake, sample_spec)
    frame = generate_tickets(1000).iloc[600:].copy()
    cases = []
    no_plan = _spec_with(sample_spec, categorical_features=["channel"])
    cases.append((no_plan, frame, "column 'plan' of the table is missing"))
    strings = frame.assign(ticket_id=[f"T-{i}" for i in frame["ticket_id"]])
    cases.append((sample_spec, strings, "column 'ticket_id' is string, the table has int64"))
    extra = _spec_with(sample_spec, numeric_features=[*sample_spec.numeric_features, "priority"])
    cases.append((extra, frame.assign(priority=1.0), "column 'priority' is not in the table"))
    for i, (spec, data, expected) in enumerate(cases):
        path = tmp_path / f"case{i}.csv"
        data.to_csv(path, index=False)
        with pytest.raises(LifecycleError) as err:
            ingest_dataset(lake, spec.model_copy(update={"source": str(path)}))
        assert expected in str(err.value) and "\n" not in str(err.value) and str(path) in str(err.value)
        assert table_state(lake, "tickets").version == base.table_version and _uncommitted(lake) == []

    allowed = _spec_with(extra, ingest={"allow_new_columns": ["priority"]})
    path = tmp_path / "allowed.csv"
    frame.assign(priority=2.0).to_csv(path, index=False)
    grown = ingest_dataset(lake, allowed.model_copy(update={"source": str(path)}))
    assert grown.rows == 1000 and grown.schema_["priority"] == "double"
    back = read_dataset(lake, grown)
    assert back["priority"].isna().sum() == 600 and (back["priority"].dropna() == 2.0).all()


CONCURRENT = """
import json, os, sys, time
import tasks.ingest as ingest
from infra_blocks import ObjectStore
from lifecycle.sample import SAMPLE_SPEC
from lifecycle.spec import parse_spec
from tasks.lake import CommitConflict
url, endpoint, source, barrier = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
store = ObjectStore(url=url, endpoint_url=endpoint or None, region="us-east-1",
                    access_key_id=%r if endpoint else None, secret_access_key=%r if endpoint else None)
audit, commit, seen = ingest.audit_files, ingest.commit_files, {"conflicts": 0}

def audited(*args, **kwargs):  # both writers have read the table before either commits: a real race
    result = audit(*args, **kwargs)
    open(os.path.join(barrier, str(os.getpid())), "w").close()
    deadline = time.time() + 120
    while len(os.listdir(barrier)) < 2 and time.time() < deadline:
        time.sleep(0.01)
    return result

def counted(*args, **kwargs):
    try:
        return commit(*args, **kwargs)
    except CommitConflict:
        seen["conflicts"] += 1
        raise

ingest.audit_files, ingest.commit_files = audited, counted
record = ingest.ingest_dataset(store, parse_spec({**SAMPLE_SPEC, "source": source}))
print(json.dumps({"version": record.table_version, "rows": record.rows, **seen}))
""" % (S3_KEY, S3_SECRET)


@pytest.mark.parametrize("existing", [False, True], ids=["creating", "appending"])
def test_two_processes_appending_at_once_both_commit(store, tmp_path, sample_spec, existing):
    """Both create the table (one loses: the create conflicts) or both append to it (one commit conflicts)."""
    first = 0
    if existing:
        first = ingest_dataset(store, sample_spec.model_copy(update={"source": _land(store, "v0.csv", generate_tickets(
            1000).iloc[800:])})).table_version + 1
    frames = [generate_tickets(800).iloc[:400], generate_tickets(800).iloc[400:]]
    sources = []
    for i, frame in enumerate(frames):
        sources.append(tmp_path / f"w{i}.csv")
        frame.to_csv(sources[-1], index=False)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, store.url, store.endpoint_url or "", str(src),
                               str(barrier)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for src in sources]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    rows = 800 + 200 * existing
    assert sorted(r["version"] for r in results) == [first, first + 1] and max(r["rows"] for r in results) == rows
    assert sorted(r["conflicts"] for r in results) == [0, 1]  # the loser re-read the table and committed after
    state = table_state(store, "tickets")
    assert state.version == first + 1 and state.rows == rows and len(state.commits) == 2 + existing
    assert _second_reader(store, first + 1) == list(range(1, rows + 1))  # nothing lost


def test_a_bad_landing_is_quarantined_and_the_next_good_one_commits(store, sample_spec):
    from tests.tasks.test_validation import bad_tickets

    good = ingest_dataset(store, sample_spec.model_copy(update={"source": _land(store, "good.csv",
                                                                                generate_tickets(600))}))
    bad = bad_tickets(600)
    bad["ticket_id"] += 300  # ids 301-600 repeat the table's, besides the injected bad rows
    with pytest.raises(LandingQuarantined) as err:
        ingest_dataset(store, sample_spec.model_copy(update={"source": _land(store, "bad.csv", bad)}))
    message, report = str(err.value), err.value.report
    assert "\n" not in message and "failed validation" in message and "nothing committed" in message
    for name in ("expect_column_values_to_be_between(sentiment)", "expect_column_values_to_be_unique(ticket_id)",
                 "expect_column_values_to_be_in_set(category)"):
        assert name in message
    unique = next(f for f in report.failed if f.expectation == "expect_column_values_to_be_unique")
    assert "already in the table" in unique.detail

    state = table_state(store, "tickets")
    assert state.version == good.table_version and _uncommitted(store) == []
    held = store.list_keys(f"quarantine/tickets/{report.dataset_version}")
    assert any(k.endswith(".parquet") for k in held)
    assert f"quarantine/tickets/{report.dataset_version}/report.json" in held
    assert report.docs_key in held and not report.success

    nxt = generate_tickets(1000).iloc[600:]
    after = ingest_dataset(store, sample_spec.model_copy(update={"source": _land(store, "next.csv", nxt)}))
    assert (after.table_version, after.rows) == (good.table_version + 1, 1000)


def test_uncommitted_files_in_the_table_location_are_invisible(lake, sample_spec):
    first = ingest_dataset(lake, sample_spec)
    lake.write_bytes("datasets/tickets/part-crashed-00000.parquet", b"partial")
    assert version_record(lake, "tickets").parts == first.parts
    assert _second_reader(lake, 0) == list(range(1, 601))


def test_a_table_written_outside_the_lifecycle_is_named_in_one_line(lake):
    from deltalake import write_deltalake

    write_deltalake(table_uri(lake, "other"), pd.DataFrame({"x": [1]}))
    with pytest.raises(LifecycleError, match=r"other@0: not written by the lifecycle"):
        version_record(lake, "other")


@pytest.mark.parametrize("ids", [[1, 2, 3, 4, 5, 6], ["a", "b", "c", "d", "e", "f"]], ids=["int", "str"])
def test_id_checks_read_only_ids_and_find_repeats_across_files_and_versions(lake, sample_spec, ids):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.audit import id_failures

    def put(key, values):
        lake.filesystem().makedirs(lake.path("t"), exist_ok=True)
        pq.write_table(pa.table({"ticket_id": values, "text": ["x"] * len(values)}), lake.path(key))
        return key

    earlier = [put("t/old0.parquet", ids[:2]), put("t/old1.parquet", ids[2:3])]
    new = [put("t/new0.parquet", [ids[1], ids[3], ids[4]]), put("t/new1.parquet", [ids[4], ids[5], ids[2]])]
    assert id_failures(lake, sample_spec, new, earlier) == [
        f"1 id repeated across the new files, e.g. {ids[4]}", f"2 ids already in the table, e.g. {ids[1]}, {ids[2]} "
        "(a source that is a whole new snapshot needs `ingest: {mode: replace}` in the spec)"]
    assert id_failures(lake, sample_spec, new[:1], []) == []


def test_an_append_of_fresh_ids_reads_no_earlier_ids_and_a_repeat_inside_a_range_is_still_found(
        lake, sample_spec, tmp_path, monkeypatch):
    """The files' id ranges are in the Delta stats; the audit reads ids only when a new file's range meets
    an earlier file's, and then an earlier file's only when its range holds one of the landing's ids (a
    second reader sees the same stats)."""
    import tasks.audit

    frame = generate_tickets(300, seed=1)
    first = tmp_path / "first.csv"
    frame.to_csv(first, index=False)
    ingest_dataset(lake, sample_spec.model_copy(update={"source": str(first)}))
    state = table_state(lake, "tickets")
    assert set(state.int_ranges("ticket_id").values()) == {(int(frame.ticket_id.min()), int(frame.ticket_id.max()))}

    read: list[str] = []
    real = tasks.audit._ids
    monkeypatch.setattr(tasks.audit, "_ids", lambda store, key, col: read.append(key) or real(store, key, col))
    fresh = generate_tickets(50, seed=2).assign(ticket_id=range(10_000, 10_050))
    fresh.to_csv(tmp_path / "fresh.csv", index=False)
    ingest_dataset(lake, sample_spec.model_copy(update={"source": str(tmp_path / "fresh.csv")}))
    earlier = set(state.keys())
    assert read == [], read  # its range meets no earlier file's: no ids read at all, not even its own

    read.clear()
    repeat = fresh.assign(ticket_id=[20_000 + i for i in range(49)] + [int(frame.ticket_id.iloc[7])])
    repeat.to_csv(tmp_path / "repeat.csv", index=False)
    with pytest.raises(LandingQuarantined, match="1 id already in the table"):
        ingest_dataset(lake, sample_spec.model_copy(update={"source": str(tmp_path / "repeat.csv")}))
    assert earlier & set(read)


def test_new_files_are_checked_in_groups_of_overlapping_id_ranges(lake, sample_spec, monkeypatch):
    """With every file's id range known, a repeat across overlapping new files and one already in the
    table are still found, files whose ranges are apart are checked apart, and an earlier file is read
    only for the group whose range reaches it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import tasks.audit
    from tasks.audit import _overlapping, id_failures

    def put(key, values):
        lake.filesystem().makedirs(lake.path("g"), exist_ok=True)
        pq.write_table(pa.table({"ticket_id": values}), lake.path(key))
        return key, (min(values), max(values))

    ranges = dict([put("g/old.parquet", [1, 2, 3]), put("g/a.parquet", [10, 12, 14]),
                   put("g/b.parquet", [13, 14, 16]), put("g/c.parquet", [20, 21, 2]), put("g/d.parquet", [30, 31, 32])])
    new, earlier = ["g/a.parquet", "g/b.parquet", "g/c.parquet", "g/d.parquet"], ["g/old.parquet"]
    assert _overlapping(new, ranges, earlier) == [["g/c.parquet", "g/a.parquet", "g/b.parquet"], ["g/d.parquet"]]
    assert _overlapping(new, {k: v for k, v in ranges.items() if k != "g/old.parquet"}, earlier) == [new]

    read: list[str] = []
    real = tasks.audit._ids
    monkeypatch.setattr(tasks.audit, "_ids", lambda store, key, col: read.append(key) or real(store, key, col))
    assert id_failures(lake, sample_spec, new, earlier, ranges) == [
        "1 id repeated across the new files, e.g. 14", "1 id already in the table, e.g. 2 "
        "(a source that is a whole new snapshot needs `ingest: {mode: replace}` in the spec)"]
    assert read.count("g/old.parquet") == 1
