"""Ingest flow: raw source → an immutable, content-versioned dataset in the lake."""

from __future__ import annotations

from prefect import flow

from infra_blocks import ObjectStore
from lifecycle.records import DatasetVersion
from lifecycle.spec import DatasetSpec
from tasks.ingest import ingest_task
from tasks.records import publish_record


@flow(name="ingest", log_prints=True)
def ingest(spec: DatasetSpec, store: ObjectStore) -> DatasetVersion:
    """Ingest the spec's source; the same content yields the same version and writes nothing new."""
    dataset = ingest_task(store, spec)
    publish_record(store, dataset)
    return dataset
