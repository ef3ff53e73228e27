"""Retention: a lake with five versions and a model deployed from version one, `gc --keep 2`.

Version one (table version 0) stays readable exactly, the last two versions stay, the files only
versions two and three referenced go, a fresh uncommitted file (an ingest in flight) is never touched,
and a second run removes nothing. The same on moto's S3 server (in its own process). Quarantined
landings, LanceDB versions and embedding sets (with their records) are kept or removed by the same rules.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta, timezone

import pandas as pd
import pyarrow as pa

from lifecycle.records import (
    DatasetVersion,
    Deployment,
    EmbeddingSet,
    IndexVersion,
    ModelVersion,
    TrainedModel,
    ValidationReport,
    dump_record,
)
from lifecycle.sample import generate_tickets
from lifecycle.spec import parse_spec
from tasks.ingest import ingest_dataset, quarantine_prefix, read_dataset
from tasks.lake import table_key, table_uri, version_record
from tasks.lancedb_index import dataset_tag
from tasks.records import find_record, save_record
from tasks.retention import RetentionPolicy, collect_garbage, plan_retention

HOUR = 3600


def _land(store, name: str, frame: pd.DataFrame) -> str:
    store.write_bytes(f"landing/tickets/{name}", frame.to_csv(index=False).encode())
    return store.uri(f"landing/tickets/{name}")


def five_versions(store, spec) -> tuple[list[DatasetVersion], list[pd.DataFrame]]:
    """Appends (versions 0-2), a replace (3) and an append (4): versions 1 and 2 hold files no later
    version references, which is what retention can remove."""
    frames = [generate_tickets(1000).iloc[i * 200:(i + 1) * 200] for i in range(5)]
    records = []
    for i, frame in enumerate(frames):
        mode = "replace" if i == 3 else "append"
        landed = parse_spec({**spec.model_dump(mode="json"), "source": _land(store, f"{i}.csv", frame),
                             "ingest": {**spec.ingest.model_dump(mode="json"), "mode": mode}})
        records.append(ingest_dataset(store, landed))
    assert [r.table_version for r in records] == [0, 1, 2, 3, 4]
    return records, frames


def deploy_from(store, dataset: DatasetVersion, index: IndexVersion | None = None) -> None:
    """The records a register + deploy of a model trained on `dataset` leave (no MLflow needed)."""
    save_record(store, dataset)
    trained = TrainedModel(id="trained1", dataset="tickets", dataset_version=dataset.id, run_id="run1",
                           model_uri="runs:/run1/model", metrics={"accuracy": 0.9}, primary_metric="accuracy",
                           greater_is_better=True, inputs={"dataset": dataset.id})
    model = ModelVersion(id="modelv1", dataset="tickets", model_name="tickets", version="1", run_id="run1",
                         trained_model=trained.id, aliases=["champion"], promoted=True, decision="first",
                         metric="accuracy", challenger_value=0.9, inputs={"model": trained.id})
    if index is not None:
        save_record(store, index)
    deployment = Deployment(id="deploy1", dataset="tickets", model_name="tickets", model_version="1",
                            index_version=index.id if index else None, target="process",
                            endpoint="http://127.0.0.1:9", handle="1", status="serving",
                            inputs={"model_version": model.id, **({"index": index.id} if index else {})})
    for record in (trained, model, deployment):
        save_record(store, record)


def _data_files(store) -> set[str]:
    return {k for k in store.list_keys(table_key("tickets")) if "/_delta_log/" not in k}


def _ids_at(store, version: int) -> list[int]:
    """The ids of a table version as delta-rs itself reads it (time travel, no lifecycle code)."""
    from deltalake import DeltaTable

    table = DeltaTable(table_uri(store, "tickets"), version=version, storage_options=store.delta_storage_options())
    return sorted(table.to_pyarrow_dataset().to_table(columns=["ticket_id"]).column(0).to_pylist())


def _age_files(store, seconds: float) -> None:
    for key in _data_files(store):
        path = store.path(key)
        os.utime(path, (time.time() - seconds, time.time() - seconds))


def _check_gc(store, records, frames, policy, expected_removed: set[str], fresh: str) -> None:
    before = _data_files(store)
    plan = collect_garbage(store, None, policy, dry_run=True)
    assert {i.what for i in plan.removed} == expected_removed and _data_files(store) == before  # a plan only

    report = collect_garbage(store, None, policy)
    assert {i.what for i in report.removed if i.area == "table"} == expected_removed
    assert report.bytes_freed == sum(i.bytes for i in plan.removed) > 0
    assert _data_files(store) == before - expected_removed and fresh in _data_files(store)
    kept = {i.what: i.why for i in report.kept if i.area == "table"}
    assert "model tickets v1" in kept["version 0"] and "deployment deploy1 (serving)" in kept["version 0"]
    assert kept["version 3"] == "one of the last 2 versions" and kept["version 4"] == "latest"
    assert "version 1" not in kept and "version 2" not in kept

    # Version one reads back exactly: the same rows in the same order, the same record from the log.
    assert read_dataset(store, records[0])["ticket_id"].tolist() == frames[0]["ticket_id"].tolist()
    assert _ids_at(store, 0) == sorted(frames[0]["ticket_id"])
    assert version_record(store, "tickets", 0).id == records[0].id
    assert _ids_at(store, 4) == sorted(pd.concat(frames[3:])["ticket_id"])
    assert collect_garbage(store, None, policy).removed == []  # idempotent


def test_gc_keeps_what_a_deployed_model_was_built_from_and_the_last_versions(lake, sample_spec):
    records, frames = five_versions(lake, sample_spec)
    deploy_from(lake, records[0])
    _age_files(lake, 2 * HOUR)
    crashed = "datasets/tickets/part-crashed-00000.parquet"  # an ingest stopped hours ago
    lake.write_bytes(crashed, b"partial")
    os.utime(lake.path(crashed), (time.time() - 2 * HOUR,) * 2)
    fresh = "datasets/tickets/part-inflight-00000.parquet"  # an ingest writing right now
    lake.write_bytes(fresh, b"being written")
    only_old = set(records[1].added_files) | set(records[2].added_files)

    # delta-rs's vacuum picks the same files when told which versions to keep (but ages by tombstone
    # time and writes commits: tasks/retention.py says why it is not used); the fresh file aside.
    from deltalake import DeltaTable

    vacuum = DeltaTable(table_uri(lake, "tickets")).vacuum(retention_hours=0, dry_run=True, full=True,
                                                             enforce_retention_duration=False, keep_versions=[0, 3, 4])
    assert {f"datasets/tickets/{f}" for f in vacuum} == only_old | {crashed, fresh}

    _check_gc(lake, records, frames, RetentionPolicy(keep=2), only_old | {crashed}, fresh)
    report = plan_retention(lake, None, RetentionPolicy(keep=2))
    assert any(i.what == fresh and "in flight" in i.why for i in report.kept)


def test_gc_on_s3_keeps_version_one_and_removes_what_only_old_versions_used(s3_lake, sample_spec):
    records, frames = five_versions(s3_lake, sample_spec)
    deploy_from(s3_lake, records[0])
    min_age = timedelta(seconds=15)  # longer than the three runs below take, so the fresh file stays young
    time.sleep(min_age.total_seconds() + 1)  # S3 keeps its own LastModified: let the table age instead
    fresh = "datasets/tickets/part-inflight-00000.parquet"
    s3_lake.write_bytes(fresh, b"being written")
    only_old = set(records[1].added_files) | set(records[2].added_files)
    _check_gc(s3_lake, records, frames, RetentionPolicy(keep=2, min_age=min_age), only_old, fresh)


def test_nothing_is_removed_from_a_dataset_whose_model_chain_is_broken(lake, sample_spec):
    records, frames = five_versions(lake, sample_spec)
    deploy_from(lake, records[0])
    lake.delete("records/model/trained1.json")  # which dataset version did model v1 train on? unknown
    report = collect_garbage(lake, None, RetentionPolicy(keep=1, min_age=timedelta(0)))
    assert [i for i in report.removed if i.area == "table"] == []
    assert any(i.what == "every file" and "trained-model record trained1 is missing" in i.why for i in report.kept)
    assert _ids_at(lake, 1) == sorted(pd.concat(frames[:2])["ticket_id"])


def _quarantine(store, landing: str, hours_ago: float) -> None:
    prefix = quarantine_prefix("tickets", landing)
    store.write_bytes(f"{prefix}/part-{landing}-00000.parquet", b"rows that failed")
    report = ValidationReport(id=landing, dataset="tickets", dataset_version=landing, success=False, evaluated=9,
                              created_at=datetime.now(timezone.utc) - timedelta(hours=hours_ago))
    store.write_bytes(f"{prefix}/report.json", dump_record(report))


def test_quarantine_keeps_the_newest_landings_per_dataset(lake):
    for n, hours in enumerate([5, 0.5, 30, 0.01, 12]):
        _quarantine(lake, f"landing{n}", hours)
    policy = RetentionPolicy(keep=2)
    report = collect_garbage(lake, None, policy)
    removed = {i.what for i in report.removed}
    assert removed == {"quarantine/tickets/landing0", "quarantine/tickets/landing2", "quarantine/tickets/landing4"}
    assert all(i.bytes > 0 for i in report.removed)
    kept = {i.what for i in report.kept if i.area == "quarantine"}
    assert kept == {"quarantine/tickets/landing1", "quarantine/tickets/landing3"}
    assert {k.split("/")[2] for k in lake.list_keys("quarantine")} == {"landing1", "landing3"}

    _quarantine(lake, "landing5", 0.0)  # the newest now: landing1 is third, but younger than min_age
    again = collect_garbage(lake, None, policy)
    assert again.removed == [] and any(i.what.endswith("landing1") and "younger" in i.why for i in again.kept)


def test_index_versions_of_unkept_dataset_versions_are_pruned(lake, sample_spec, tmp_path, monkeypatch):
    import tasks.retention as retention
    from infra_blocks import VectorStore

    records, _ = five_versions(lake, sample_spec)
    vectors = VectorStore(uri=str(tmp_path / "lancedb"))
    db = vectors.connect()
    table = db.create_table("tickets", pa.table({"id": [0], "vector": [[0.0, 0.0]]}))  # versions 1, 2: untagged
    table.add(pa.table({"id": [1], "vector": [[0.0, 1.0]]}))
    time.sleep(2)  # older than the first tag by more than the lancedb-only cutoff margin (set to 1 s below)
    for n, record in enumerate(records):  # versions 3-7, tagged with their dataset version as the index stage does
        rows = pa.table({"id": list(range(n + 1)), "vector": [[float(n), 1.0]] * (n + 1)})
        table = db.create_table("tickets", rows, mode="overwrite")
        table.tags.create(dataset_tag(record.id), table.version)
    version = {i: table.tags.list()[dataset_tag(r.id)]["version"] for i, r in enumerate(records)}
    assert list(version.values()) == [3, 4, 5, 6, 7]
    index = IndexVersion(id="index1", dataset="tickets", dataset_version=records[1].id, embedding_set="e1",
                         uri=vectors.uri, table="tickets", table_version=4, tag=dataset_tag(records[1].id),
                         index_type="exact", rows=2, k=1, recall_at_k=1.0, p50_ms=1.0, p95_ms=1.0)
    deploy_from(lake, records[0], index)  # model from version 0, serving the index of version 1
    monkeypatch.setattr(retention, "FLOOR_MARGIN_S", 1.0)
    policy = RetentionPolicy(keep=2, min_age=timedelta(0))

    report = collect_garbage(lake, vectors, policy)
    index_items = [i for i in report.removed if i.area == "index"]
    assert [i.tag for i in index_items if i.tag] == [dataset_tag(records[2].id)]
    table = vectors.connect().open_table("tickets")
    assert set(table.tags.list()) == {dataset_tag(records[i].id) for i in (0, 1, 3, 4)}
    kept = {i.what: i.why for i in report.kept if i.area == "index"}
    assert "deployment deploy1 (serving)" in kept[f"tickets: tag {dataset_tag(records[1].id)} (version 4)"]
    assert "model tickets v1" in kept[f"tickets: tag {dataset_tag(records[0].id)} (version 3)"]
    pruned = next(i for i in index_items if "old versions" in i.what)
    assert pruned.bytes > 0
    left = {v["version"] for v in table.list_versions()}
    if retention._pylance():  # Lance prunes every untagged version
        assert pruned.what == "tickets: 3 old versions" and left == {3, 4, 6, 7}
    else:  # lancedb alone: only what is older than the oldest kept tag; the untagged version 5 waits
        assert pruned.what == "tickets: 2 old versions" and left == {3, 4, 5, 6, 7}
        assert any("cannot prune past" in i.why for i in report.kept if i.area == "index")
    table.checkout(dataset_tag(records[0].id))
    assert table.to_arrow().column("id").to_pylist() == [0]  # the deployed model's index, by its tag
    assert [i for i in collect_garbage(lake, vectors, policy).removed if i.area == "index"] == []


def _own(s: EmbeddingSet) -> set[str]:
    """The parts a set wrote itself (not those it inherited from the set it extends)."""
    return {p for p in s.parts if p.startswith(f"embeddings/tickets/{s.id}/")}


def _age(store, prefix: str, seconds: float) -> None:
    for key in store.list_keys(prefix):
        os.utime(store.path(key), (time.time() - seconds,) * 2)


def test_gc_keeps_the_embeddings_of_kept_versions_and_the_latest_set_and_forgets_the_rest(lake, sample_spec,
                                                                                         local_compute):
    """Real embed stages over the five versions (appends extend the set before, the replace does not)."""
    from flows.embed import embed
    from tasks.embeddings import read_embeddings

    def passed(r: DatasetVersion) -> ValidationReport:
        return ValidationReport(id=f"report-{r.id}", dataset="tickets", dataset_version=r.id, success=True,
                                evaluated=10)

    records, frames = five_versions(lake, sample_spec)
    sets = [embed(sample_spec, r, passed(r), lake, local_compute) for r in records]
    assert [s.extends for s in sets] == [None, sets[0].id, sets[1].id, None, sets[3].id]
    deploy_from(lake, records[0])
    crashed, fresh = "embeddings/tickets/crashed/part-00000.parquet", "embeddings/tickets/inflight/part-00000.parquet"
    lake.write_bytes(crashed, b"an embed stopped hours ago")
    _age(lake, "embeddings", 2 * HOUR)  # the table's files stay young: version 2's rows can be embedded again
    lake.write_bytes(fresh, b"an embed writing right now")
    policy = RetentionPolicy(keep=1)
    doomed = _own(sets[1]) | _own(sets[2]) | {crashed}
    forgotten = {f"records/embeddings/{s.id}.json" for s in sets[1:3]}
    before = set(lake.list_keys("embeddings"))

    plan = collect_garbage(lake, None, policy, dry_run=True)
    assert {i.what for i in plan.removed if i.area == "embeddings"} == doomed | forgotten
    assert set(lake.list_keys("embeddings")) == before and all(find_record(lake, EmbeddingSet, s.id) for s in sets)

    report = collect_garbage(lake, None, policy)
    assert {i.what for i in report.removed if i.area == "embeddings"} == doomed | forgotten
    assert set(lake.list_keys("embeddings")) == before - doomed and fresh in before - doomed
    assert [find_record(lake, EmbeddingSet, s.id) is not None for s in sets] == [True, False, False, True, True]
    kept = {i.what: i.why for i in report.kept if i.area == "embeddings"}
    assert "model tickets v1" in kept[f"set {sets[0].id} (dataset version {records[0].id})"]
    assert "the latest set" in kept[f"set {sets[4].id} (dataset version {records[4].id})"]
    assert "in a kept set" in kept[f"set {sets[3].id} (dataset version {records[3].id})"]  # set 4 starts with it
    assert "in flight" in kept[fresh]
    assert read_embeddings(lake, sets[0]).column("id").to_pylist() == frames[0]["ticket_id"].tolist()
    assert read_embeddings(lake, sets[4]).column("id").to_pylist() == pd.concat(frames[3:])["ticket_id"].tolist()
    assert collect_garbage(lake, None, policy).removed == []  # idempotent

    # The embed stage: the latest version is still cached; a version whose set went is embedded again.
    assert embed(sample_spec, records[4], passed(records[4]), lake, local_compute).created_at == sets[4].created_at
    again = embed(sample_spec, records[1], passed(records[1]), lake, local_compute)
    assert again.id == sets[1].id and again.created_at != sets[1].created_at and again.encoded_rows == 400
    assert read_embeddings(lake, again).column("id").to_pylist() == pd.concat(frames[:2])["ticket_id"].tolist()


def synthetic_sets(store, records: list[DatasetVersion]) -> list[EmbeddingSet]:
    """EmbeddingSet records and parts shaped as the embed stage leaves them for `five_versions`, no encoder:
    versions 1, 2 and 4 extend the set before (their parts start with its parts), the replace (3) does not."""
    sets: list[EmbeddingSet] = []
    for i, record in enumerate(records):
        base = sets[-1] if i not in (0, 3) else None
        own = f"embeddings/tickets/set{i}/part-00000.parquet"
        store.write_bytes(own, b"vectors of version %d" % i)
        sets.append(EmbeddingSet(id=f"set{i}", dataset="tickets", dataset_version=record.id, model="m", dim=384,
                                 rows=200, parts=[*(base.parts if base else []), own], encoded_rows=200,
                                 extends=base.id if base else None))
        save_record(store, sets[-1])
    return sets


def _embedding_items(report) -> list:
    return [i for i in report.removed if i.area == "embeddings"]


def test_nothing_is_removed_from_embeddings_whose_records_are_unclear(lake, sample_spec):
    records, _ = five_versions(lake, sample_spec)
    deploy_from(lake, records[0])
    sets = synthetic_sets(lake, records)
    policy = RetentionPolicy(keep=1, min_age=timedelta(0))
    lake.write_bytes("records/embeddings/torn.json", b'{"id": "torn", "dataset": "tickets", "parts": [')
    report = plan_retention(lake, None, policy)
    assert _embedding_items(report) == []
    assert any(i.what == "every file" and "torn.json cannot be read" in i.why for i in report.kept)
    lake.delete("records/embeddings/torn.json")

    orphan = sets[2].model_copy(update={"extends": "gone"})  # which set do its parts start with? unknown
    save_record(lake, orphan)
    report = plan_retention(lake, None, policy)
    assert _embedding_items(report) == [] and any("whose record is missing" in i.why for i in report.kept)
    save_record(lake, sets[4])  # sets back as they were (the latest pointer too)
    save_record(lake, sets[2].model_copy(update={"parts": sets[2].parts[1:]}))  # not starting with set 1's parts
    report = plan_retention(lake, None, policy)
    assert _embedding_items(report) == [] and any("does not start with the parts" in i.why for i in report.kept)
    save_record(lake, sets[2])
    save_record(lake, sets[4])
    assert {i.what for i in _embedding_items(plan_retention(lake, None, policy))} == {
        "embeddings/tickets/set1/part-00000.parquet", "embeddings/tickets/set2/part-00000.parquet",
        "records/embeddings/set1.json", "records/embeddings/set2.json"}


def test_embedding_gc_on_s3_removes_the_parts_and_records_of_unkept_sets(s3_lake, sample_spec):
    records, _ = five_versions(s3_lake, sample_spec)
    deploy_from(s3_lake, records[0])
    sets = synthetic_sets(s3_lake, records)
    policy = RetentionPolicy(keep=1, min_age=timedelta(0))
    report = collect_garbage(s3_lake, None, policy)
    assert {i.what for i in _embedding_items(report)} == {
        "embeddings/tickets/set1/part-00000.parquet", "embeddings/tickets/set2/part-00000.parquet",
        "records/embeddings/set1.json", "records/embeddings/set2.json"}
    assert set(s3_lake.list_keys("embeddings")) == {p for s in (sets[0], sets[4]) for p in s.parts}
    assert [find_record(s3_lake, EmbeddingSet, s.id) is not None for s in sets] == [True, False, False, True, True]
    assert _embedding_items(collect_garbage(s3_lake, None, policy)) == []
