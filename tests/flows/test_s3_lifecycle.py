"""The lake on a real S3 endpoint (moto server): the whole lifecycle with only the block documents
changed, an endpoint that dies in the middle of an ingest, and the validation gate on S3."""

from __future__ import annotations

import os
import uuid

import httpx
import pyarrow.parquet as pq
import pytest

import flows.ingest
import tasks.ingest
import tasks.sources
from flows.ingest import ingest
from infra_blocks import MlflowTarget, ObjectStore, ServingTarget, VectorStore
from infra_blocks.profiles import Targets
from lifecycle.errors import LifecycleError, StoreUnavailableError
from lifecycle.records import EmbeddingSet, ModelVersion, TrainedModel, ValidationReport
from lifecycle.sample import generate_tickets
from tasks.ingest import ingest_dataset
from tasks.records import latest_record
from tests.fixtures.s3 import BUCKET, S3_KEY, S3_SECRET, free_port
from tests.flows.test_validate import read_artifact
from tests.tasks.test_validation import bad_tickets


def _bucket_keys(endpoint: str, bucket: str, prefix: str) -> list[str]:
    """Keys as the S3 server itself lists them (not through the block under test)."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
                          region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _s3_targets(tmp_path, store: ObjectStore, compute) -> Targets:
    """The local profile's blocks with the lake and the vector store moved to S3; nothing else changes."""
    return Targets(
        store=store,
        compute=compute,
        mlflow=MlflowTarget(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                            artifact_location=f"file://{tmp_path}/mlartifacts", experiment="lifecycle-s3"),
        vectors=VectorStore(uri=store.uri("lancedb"), access_key_id=S3_KEY, secret_access_key=S3_SECRET,
                            storage_options={"endpoint": store.endpoint_url, "allow_http": "true",
                                             "region": "us-east-1"}),
        serving=ServingTarget(kind="process", host="127.0.0.1", port=free_port(), workdir=str(tmp_path / "serving")),
    )


def _worker_round_trip(store: ObjectStore, key: str) -> tuple[int, bytes]:
    """Run on a Dask worker: write and read back an object through the block alone."""
    store.write_bytes(key, f"written by {os.getpid()}".encode())
    return os.getpid(), store.read_bytes(key)


@pytest.mark.slow
def test_whole_lifecycle_on_s3_matches_the_file_lake(tmp_path, s3_lake, lake, sample_spec, local_compute,
                                                     monkeypatch):
    from flows.lifecycle import lifecycle_with_targets
    from flows.validate import validate
    from tasks.serving import stop_current

    monkeypatch.chdir(tmp_path)
    on_file = validate(sample_spec, ingest(sample_spec, lake), lake)

    # The Dask workers are separate processes: they reach S3 with nothing but the pickled block.
    with local_compute.get_client() as client:
        pid, data = client.submit(_worker_round_trip, s3_lake, "probe/worker.txt", pure=False).result()
    assert pid != os.getpid() and data == f"written by {pid}".encode()

    targets = _s3_targets(tmp_path, s3_lake, local_compute)
    try:
        result = lifecycle_with_targets(sample_spec, targets)
        assert result.dataset.id == on_file.dataset_version
        assert (result.validation.success, result.validation.evaluated) == (on_file.success, on_file.evaluated)
        assert [s.status for s in result.stages] == ["ran"] * 7

        prefix = s3_lake.path("").split("/", 1)[1]
        keys = _bucket_keys(s3_lake.endpoint_url, BUCKET, prefix)
        names = {k[len(prefix) + 1:] for k in keys}
        assert "datasets/tickets/_delta_log/00000000000000000000.json" in names  # a Delta table on S3
        assert set(result.dataset.parts) <= names and result.dataset.table_version == 0
        assert result.validation.docs_key in names
        assert set(result.embeddings.parts) <= names  # written by the workers
        assert any(k.startswith("lancedb/") for k in names)  # LanceDB on S3 too
        for cls in (ValidationReport, EmbeddingSet, TrainedModel, ModelVersion):
            assert latest_record(s3_lake, cls, "tickets") is not None
        assert not (tmp_path / ".lifecycle").exists()

        # The served index is read from S3 by the serving process.
        hits = httpx.post(f"{result.deployment.endpoint}/search", json={"query": "refund invoice", "k": 3},
                          timeout=30).json()["results"]
        assert len(hits) == 3 and all(h["metadata"]["category"] == "billing" for h in hits)
    finally:
        stop_current(targets.serving)


def test_validation_failure_on_s3_is_named_documented_and_stops_the_lifecycle(tmp_path, s3_lake, sample_files,
                                                                              local_compute):
    """Later stages never see a quarantined landing: the audit inside ingest refuses it before the commit,
    the lifecycle stops there, and the report and Data Docs land in the quarantine on S3."""
    from flows.lifecycle import lifecycle_with_targets

    bad_tickets().to_csv(sample_files[0], index=False)
    from lifecycle.spec import load_spec

    spec = load_spec(sample_files[1])
    with pytest.raises(LifecycleError) as failure:
        lifecycle_with_targets(spec, _s3_targets(tmp_path, s3_lake, local_compute))
    message = str(failure.value)
    assert "\n" not in message and "failed validation" in message
    for name in ("expect_column_values_to_be_between(sentiment)", "expect_column_values_to_not_be_null(ticket_id)",
                 "expect_column_values_to_be_unique(ticket_id)", "expect_column_values_to_be_in_set(category)"):
        assert name in message

    report = latest_record(s3_lake, ValidationReport, "tickets")
    assert report is not None and report.quarantined
    artifact = read_artifact("validation-tickets").data
    assert "quarantined" in artifact and s3_lake.uri(report.docs_key) in artifact
    for failed in report.failed:
        assert f"| {failed.expectation} | {failed.column} |" in artifact
    prefix = s3_lake.path("").split("/", 1)[1]
    names = {k[len(prefix) + 1:] for k in _bucket_keys(s3_lake.endpoint_url, BUCKET, prefix)}
    assert report.docs_key in names
    assert "<html" in s3_lake.read_bytes(report.docs_key).decode().lower()
    assert not [k for k in names if k.startswith(("embeddings/", "lancedb/", "records/embedding_set",
                                                  "records/trained_model", "records/model_version"))]
    assert report.docs_key.startswith(f"quarantine/tickets/{report.dataset_version}/")  # refused before the commit
    assert not [k for k in names if k.startswith("datasets/")]  # nothing entered a table


def test_endpoint_stopped_mid_ingest_fails_after_retries_then_rerun_gives_the_same_version(
        stoppable_s3, lake, sample_spec, tmp_path, monkeypatch):
    bucket = f"fault-{uuid.uuid4().hex[:8]}"
    stoppable_s3.create_bucket(bucket)
    store = ObjectStore(url=f"s3://{bucket}/lake", endpoint_url=stoppable_s3.endpoint, region="us-east-1",
                        access_key_id=S3_KEY, secret_access_key=S3_SECRET, max_attempts=1, connect_timeout=1)
    source = tmp_path / "tickets.csv"
    generate_tickets(5000).to_csv(source, index=False)
    spec = sample_spec.model_copy(update={"source": str(source)})
    uninterrupted = ingest_dataset(lake, spec)  # default batches and parts, on the file lake

    # Several small parts, and the endpoint stops as soon as the first one is in the store.
    monkeypatch.setattr(tasks.ingest, "ROWS_PER_PART", 1000)
    monkeypatch.setattr(tasks.sources, "BLOCK_BYTES", 32 << 10)
    seen = {"attempts": 0, "stop": True}
    ingest_fn = tasks.ingest.ingest_dataset

    class StopAfterFirstPart(pq.ParquetWriter):
        def __init__(self, where, *args, **kwargs):
            super().__init__(where, *args, **kwargs)
            self.key = str(where)

        def close(self):
            super().close()
            if seen["stop"] and self.key.endswith("-00000.parquet") and stoppable_s3.running:
                stoppable_s3.stop()

    def counted(*args, **kwargs):
        seen["attempts"] += 1
        return ingest_fn(*args, **kwargs)

    monkeypatch.setattr(pq, "ParquetWriter", StopAfterFirstPart)
    monkeypatch.setattr(tasks.ingest, "ingest_dataset", counted)
    monkeypatch.setattr(flows.ingest, "ingest_task", tasks.ingest.ingest_task.with_options(retry_delay_seconds=0))

    with pytest.raises(StoreUnavailableError) as failure:
        ingest(spec, store)
    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith(f"s3://{bucket}/lake/datasets/tickets: cannot reach the object store at "
                              f"{stoppable_s3.endpoint} (")
    assert seen["attempts"] == 3  # the first try and both retries

    stoppable_s3.start()
    left = _bucket_keys(stoppable_s3.endpoint, bucket, "lake/")
    assert [k for k in left if k.endswith("-00000.parquet")], "stopped mid-ingest"
    assert not [k for k in left if "/_delta_log/" in k]  # nothing committed: no table at all

    seen["stop"] = False
    again = ingest(spec, store)
    assert again.id == uninterrupted.id and again.rows == 5000 and again.table_version == 0
    assert len(again.parts) == 5
    data = [k for k in _bucket_keys(stoppable_s3.endpoint, bucket, "lake/datasets/") if "/_delta_log/" not in k]
    assert set(data) >= {f"lake/{k}" for k in again.parts}  # orphans of the failed tries are never referenced


def test_endpoint_stopped_between_writing_and_committing_changes_nothing_then_the_retry_commits_once(
        stoppable_s3, sample_spec, tmp_path, monkeypatch):
    bucket = f"commit-{uuid.uuid4().hex[:8]}"
    stoppable_s3.create_bucket(bucket)
    store = ObjectStore(url=f"s3://{bucket}/lake", endpoint_url=stoppable_s3.endpoint, region="us-east-1",
                        access_key_id=S3_KEY, secret_access_key=S3_SECRET, max_attempts=1, connect_timeout=1)
    source = tmp_path / "tickets.csv"
    generate_tickets(1000).to_csv(source, index=False)
    spec = sample_spec.model_copy(update={"source": str(source)})
    generate_tickets(1500).iloc[1000:].to_csv(tmp_path / "v0.csv", index=False)
    first = ingest_dataset(store, spec.model_copy(update={"source": str(tmp_path / "v0.csv")}))

    commit = tasks.ingest.commit_files

    def stop_then_commit(*args, **kwargs):
        if stoppable_s3.running:
            stoppable_s3.stop()  # the files are written and audited; the commit finds no endpoint
        return commit(*args, **kwargs)

    monkeypatch.setattr(tasks.ingest, "commit_files", stop_then_commit)
    with pytest.raises(StoreUnavailableError) as failure:
        ingest_dataset(store, spec)
    assert "\n" not in str(failure.value) and "cannot reach the object store" in str(failure.value)

    stoppable_s3.start()
    from tasks.lake import table_state

    assert table_state(store, "tickets").version == first.table_version  # nothing visible changed
    monkeypatch.setattr(tasks.ingest, "commit_files", commit)
    again = ingest_dataset(store, spec)
    assert again.table_version == first.table_version + 1 and again.rows == 1500
    assert ingest_dataset(store, spec).table_version == again.table_version  # exactly once
    assert len(table_state(store, "tickets").commits) == 2
