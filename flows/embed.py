"""Embed flow: a validated dataset version → an EmbeddingSet (vectors of its text column)."""

from __future__ import annotations

from prefect import flow
from prefect.logging import get_run_logger

from infra_blocks import DaskCompute, ObjectStore
from lifecycle.records import DatasetVersion, EmbeddingSet, ValidationReport
from lifecycle.spec import DatasetSpec
from tasks.embeddings import embed_task, embedding_set_id
from tasks.records import find_record, latest_record, publish_record
from tasks.validation import require_passed


@flow(name="embed")
def embed(spec: DatasetSpec, dataset: DatasetVersion, report: ValidationReport, store: ObjectStore,
          compute: DaskCompute) -> EmbeddingSet:
    """Embed the text column on the compute target; unchanged inputs return the stored record.

    Rows of the previous embedding set whose id and text are unchanged are copied, not re-encoded.
    """
    require_passed(report, dataset)
    cached = find_record(store, EmbeddingSet, embedding_set_id(spec, dataset))
    if cached is not None:
        get_run_logger().info("embed %s: unchanged, using embedding set %s", spec.name, cached.id)
        return cached
    previous = latest_record(store, EmbeddingSet, spec.name)
    record = embed_task(store, spec, dataset, compute, previous, inputs={"validation": report.id})
    publish_record(store, record)
    return record
