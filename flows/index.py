"""Index flow: an EmbeddingSet → a tagged LanceDB table version with measured recall."""

from __future__ import annotations

from prefect import flow

from flows.embed import no_text_column
from flows.runner import Call, Input, Stage, produce
from infra_blocks import ObjectStore, VectorStore
from lifecycle.records import EmbeddingSet, IndexVersion
from lifecycle.spec import DatasetSpec
from tasks.lancedb_index import index_available, index_record_id, index_task
from tasks.records import latest_record


@flow(name="index")
def index(spec: DatasetSpec, embeddings: EmbeddingSet, store: ObjectStore, vectors: VectorStore) -> IndexVersion:
    """Write the embeddings as a new table version tagged with the dataset version.

    When the embeddings only appended rows to the latest index's set, those rows are merged into its
    table and its ANN index is extended (or rebuilt when it no longer fits); else the table is rewritten.

    A stored record is reused only while its table version still exists in this vector store.
    """
    return produce(STAGE, Call(spec, store, {"embeddings": embeddings}, (vectors,)))


def _work(call: Call, record_id: str | None) -> IndexVersion:
    previous = latest_record(call.store, IndexVersion, call.spec.name)
    return index_task(call.store, call.spec, call.get(EmbeddingSet), call.block(VectorStore), record_id, previous)


STAGE = Stage(
    name="index", record=IndexVersion, inputs=(Input("embeddings", "embeddings"),), blocks=("vectors",),
    flow=index, work=_work,
    record_id=lambda call: index_record_id(call.spec, call.get(EmbeddingSet), call.block(VectorStore)),
    reuse=lambda call, record: index_available(call.block(VectorStore), record),
    skip=no_text_column,
)
