"""Index flow: an EmbeddingSet → a tagged LanceDB table version with measured recall."""

from __future__ import annotations

from prefect import flow
from prefect.logging import get_run_logger

from infra_blocks import ObjectStore, VectorStore
from lifecycle.records import EmbeddingSet, IndexVersion
from lifecycle.spec import DatasetSpec
from tasks.lancedb_index import index_available, index_record_id, index_task
from tasks.records import find_record, publish_record


@flow(name="index")
def index(spec: DatasetSpec, embeddings: EmbeddingSet, store: ObjectStore, vectors: VectorStore) -> IndexVersion:
    """Write the embeddings as a new table version tagged with the dataset version.

    A stored record is reused only while its table version still exists in this vector store.
    """
    record_id = index_record_id(spec, embeddings, vectors)
    cached = find_record(store, IndexVersion, record_id)
    if cached is not None and index_available(vectors, cached):
        get_run_logger().info("index %s: unchanged, using %s v%d", spec.name, cached.table, cached.table_version)
        return cached
    record = index_task(store, spec, embeddings, vectors, record_id)
    publish_record(store, record)
    return record
