"""Index: an embedding set → a LanceDB table version, tagged with its dataset version, recall measured.

Why this shape:
- One table per dataset; every build is a new table *version*, tagged `ds-<dataset version>`, so the
  index of any earlier dataset version stays queryable (time travel by tag) while the latest is what
  `open_table` gives by default.
- An append does the new work only: when the embedding set starts with the parts of the set the
  latest index record holds (tasks/embeddings.py) and that record's version is still the table's
  latest, only the new rows are read and `merge_insert` on the id adds them (measured: 500 rows into
  200k in 0.02 s). Anything else (a replace version, another layout, a table moved on) rewrites the
  table in overwrite mode. The record says which (`write`) and why (`index_reason`).
- After a merge the ANN index is extended by a delta segment over the new rows, assigned to the
  trained IVF partitions (`optimize_indices(num_indices_to_merge=0)`: 0.1 s for 2k rows into 200k×384
  IVF_FLAT, where merging them into the one segment rewrote all of it in 3-6 s); at MAX_INDEX_SEGMENTS
  `optimize()` compacts the fragments and merges the segments (never pruning: retention does).
  Rebuilt with the ladder when the share of rows newer than its training exceeds
  `index.rebuild_unindexed_fraction` or recall after extending is below target; an exact table that
  grows past `ann_min_rows` gets its first index. Recall is measured for every version (for an
  append against carried truth: tasks/index_recall.py, a cost that grows with the append).
- Rows are streamed part by part (dataset part + its embedding parts, which are in the same row order),
  so memory holds one part, never the whole set.
- ANN indexes are not trusted blindly (IVF_PQ defaults reach recall@10 of 0.13 on clustered data):
  below `ann_min_rows` the table is searched exactly; above it the ladder is tried in order, each
  setting's recall@k measured on sampled queries against exact numpy search, and the first setting that
  meets `target_recall` is kept. If none does, the index is dropped and search stays exact.
- IVF_FLAT comes first: it keeps exact distances inside the probed partitions, so recall is limited
  only by partition boundaries, and it builds fastest. Measured on clustered 384-d vectors with fresh
  queries (benchmarks/index.py): IVF_FLAT recall@10 1.0 at nprobes 3 on 1M rows; at 100k rows
  IVF_HNSW_SQ reached 0.93 only with a refine step (0.99 at refine_factor 5) and IVF_PQ 0.23 at
  defaults + refine_factor 10. The quantised rungs follow for data where IVF_FLAT misses the target;
  its memory (full vectors) and k-means cost (~rows^1.5) are what limit it past a few million rows.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.logging import get_run_logger

from infra_blocks import ObjectStore, VectorStore
from lifecycle.encoder import EMBED_DIM
from lifecycle.errors import LifecycleError
from lifecycle.records import DatasetVersion, EmbeddingSet, IndexType, IndexVersion, code_version, stable_hash
from lifecycle.search import DISTANCE, TEXT
from lifecycle.spec import DatasetSpec
from tasks.embeddings import ID, VECTOR, VECTOR_TYPE, arrow_to_vectors
from tasks.index_recall import (
    ANN_LADDER,
    Ladder,
    RecallSet,
    climb_ladder,
    fresh_recall_set,
    index_markdown,
    load_recall_set,
    measure,
    recall_key,
    sample_rows,
    save_recall_set,
    vector_chunks,
)
from tasks.policies import retry_unless_user_error
from tasks.records import find_record, load_record

IndexAction = Literal["built", "extended", "rebuilt", "exact"]
RESERVED = {ID, VECTOR, TEXT, "_distance", "_rowid"}


def index_record_id(spec: DatasetSpec, embeddings: EmbeddingSet, vectors: VectorStore) -> str:
    """Record id: the embeddings, the spec parts that decide the table, the target table and this code."""
    sections = spec.section_hash("index", "id_column", "text_column", "label_column", "categorical_features")
    return stable_hash(embeddings.id, sections, vectors.uri, vectors.table_name(spec.name),
                       code_version(sys.modules[__name__]))


def dataset_tag(dataset_version: str) -> str:
    return f"ds-{dataset_version}"


def metadata_columns(spec: DatasetSpec) -> list[str]:
    """Columns stored beside the vectors: spec.index.metadata_columns, else the label and categoricals.

    Raises:
        LifecycleError: a column would collide with one the table itself defines.
    """
    columns = list(spec.index.metadata_columns) or [spec.label_column, *spec.categorical_features]
    columns = [c for c in columns if c not in (spec.id_column, spec.text_column)]
    for column in columns:
        if column in RESERVED:
            raise LifecycleError(f"spec {spec.name}: index metadata column {column!r} is a reserved name; rename it")
    return columns


def _open_parts(store: ObjectStore, keys: list[str], columns: list[str] | None) -> Iterator[pa.Table]:
    pafs = store.pyarrow_filesystem()
    for key in keys:
        yield pq.read_table(store.path(key), filesystem=pafs, columns=columns)


def table_batches(store: ObjectStore, spec: DatasetSpec, embeddings: EmbeddingSet, dataset: DatasetVersion,
                  metadata: list[str]) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """The index table's schema and its rows, one embedding part at a time.

    Raises:
        LifecycleError: a named column is missing, or the embeddings do not line up with the dataset.
    """
    missing = [c for c in [spec.id_column, *metadata] if c not in dataset.schema_]
    if missing:
        raise LifecycleError(f"dataset {spec.name}@{dataset.id}: no column(s) {', '.join(missing)} to index")
    data_cols = [spec.id_column, *([spec.text_column] if spec.text_column else []), *metadata]
    first = pq.read_schema(store.path(dataset.parts[0]), filesystem=store.pyarrow_filesystem())
    emb_first = pq.read_schema(store.path(embeddings.parts[0]), filesystem=store.pyarrow_filesystem())
    schema = pa.schema([pa.field(ID, emb_first.field(ID).type), pa.field(VECTOR, VECTOR_TYPE),
                        pa.field(TEXT, pa.string()), *(first.field(c) for c in metadata)])

    def rows() -> Iterator[pa.RecordBatch]:
        emb_parts = _open_parts(store, embeddings.parts, [ID, VECTOR])
        for data in _open_parts(store, dataset.parts, data_cols):
            offset = 0
            while offset < data.num_rows:
                emb = next(emb_parts, None)
                if emb is None or offset + emb.num_rows > data.num_rows:
                    break
                part = data.slice(offset, emb.num_rows)
                if not part.column(spec.id_column).cast(emb.column(ID).type).equals(emb.column(ID)):
                    break
                text = (part.column(spec.text_column).cast(pa.string()) if spec.text_column
                        else pa.nulls(part.num_rows, pa.string()))
                yield from pa.table([emb.column(ID), emb.column(VECTOR).cast(VECTOR_TYPE), text,
                                     *(part.column(c) for c in metadata)], schema=schema).to_batches()
                offset += emb.num_rows
            if offset != data.num_rows:
                raise LifecycleError(f"embeddings {embeddings.id}: rows do not line up with dataset "
                                     f"{spec.name}@{dataset.id}; re-run the embed stage")

    return schema, rows()


KEEP_VERSIONS = timedelta(days=365_000)  # optimize() must not prune: retention (`lifecycle gc`) does
MAX_INDEX_SEGMENTS = 8  # delta segments a query searches side by side before an append merges them


def extend_index(table: Any) -> str:
    """Index the rows an append added: one more delta segment, or every segment merged at the cap."""
    name = next(i.name for i in table.list_indices() if list(i.columns) == [VECTOR])
    segments = table.index_stats(name).num_indices
    if segments + 1 < MAX_INDEX_SEGMENTS:
        table.to_lance().optimize.optimize_indices(num_indices_to_merge=0, index_names=[name])
        table.checkout_latest()
        return f"a delta segment ({segments + 1} of {MAX_INDEX_SEGMENTS})"
    table.optimize(cleanup_older_than=KEEP_VERSIONS)
    return f"{segments + 1} segments merged into one"


@dataclass
class Outcome:
    """What one build did to the table and its index, for the record."""

    table: Any
    write: Literal["overwrite", "merge_insert"]
    added: int
    action: IndexAction
    reason: str
    trained_rows: int
    index_type: IndexType
    query: dict[str, int]
    measured: tuple[float, float, float]
    recall: RecallSet
    tried: list[dict[str, Any]] = field(default_factory=list)


def build_index(store: ObjectStore, spec: DatasetSpec, embeddings: EmbeddingSet, vectors: VectorStore,
                record_id: str | None = None, ladder: Ladder = ANN_LADDER, log: Any = None,
                previous: IndexVersion | None = None) -> IndexVersion:
    """Write the embedding set as a new version of the dataset's table, index it, measure recall, tag it.

    Args:
        previous: The dataset's latest index record: when its table version is still the table's
            latest and `embeddings` only appended rows to its set, the new rows are merged into it.

    Raises:
        LifecycleError: missing columns, misaligned embeddings, or an unreachable vector store.
    """
    dataset = load_record(store, DatasetVersion, embeddings.dataset_version)
    record_id = record_id or index_record_id(spec, embeddings, vectors)
    name = vectors.table_name(spec.name)
    base = append_base(store, spec, embeddings, vectors, previous, record_id)
    outcome = _append(store, spec, embeddings, dataset, base, ladder, log) if isinstance(base, tuple) else base
    if isinstance(outcome, str):
        outcome = _overwrite(store, spec, embeddings, dataset, name, vectors, ladder, log, outcome)
    table = outcome.table
    tag = dataset_tag(dataset.id)
    if tag in table.tags.list():
        table.tags.update(tag, table.version)
    else:
        table.tags.create(tag, table.version)
    save_recall_set(store, recall_key(spec.name, record_id), outcome.recall)
    recall, p50, p95 = outcome.measured
    return IndexVersion(
        id=record_id, dataset=spec.name, code_version=code_version(sys.modules[__name__]),
        inputs={"embeddings": embeddings.id, "dataset": dataset.id}, dataset_version=dataset.id,
        embedding_set=embeddings.id, uri=vectors.uri, table=name, table_version=table.version, tag=tag,
        index_type=outcome.index_type, rows=embeddings.rows, k=outcome.recall.k, recall_at_k=round(recall, 4),
        p50_ms=round(p50, 3), p95_ms=round(p95, 3), write=outcome.write, added_rows=outcome.added,
        index_action=outcome.action, index_reason=outcome.reason, trained_rows=outcome.trained_rows,
        index_params={"distance_type": DISTANCE, "query": outcome.query, "tried": outcome.tried,
                      "target_recall": spec.index.target_recall, "queries": len(outcome.recall.ids),
                      "recall_method": "leave-one-out", "max_chars": spec.embed.max_chars,
                      "layout": table_layout(spec)},
    )


def table_layout(spec: DatasetSpec) -> str:
    """What decides the table's columns: a table of another layout is never merged into."""
    return stable_hash(spec.id_column, spec.text_column, metadata_columns(spec))


Base = tuple[IndexVersion, EmbeddingSet, Any]


def append_base(store: ObjectStore, spec: DatasetSpec, embeddings: EmbeddingSet, vectors: VectorStore,
                previous: IndexVersion | None, record_id: str) -> Base | str:
    """(previous record, its embedding set, the open table) when the new rows can be merged; else why not."""
    if previous is None or previous.id == record_id:
        return "no earlier index of this dataset"
    if previous.uri != vectors.uri or previous.table != vectors.table_name(spec.name):
        return "the earlier index is in another vector store"
    if previous.index_params.get("layout") != table_layout(spec):
        return "the table's columns changed"
    before = find_record(store, EmbeddingSet, previous.embedding_set)
    if before is None or not before.dataset_parts or before.rows != previous.rows:
        return "the earlier index's embedding set is unknown"
    n = len(before.parts)
    if (embeddings.parts[:n] != before.parts or len(embeddings.parts) == n
            or embeddings.dataset_parts[:len(before.dataset_parts)] != before.dataset_parts):
        return "this version is not an append to the indexed one"
    try:
        table = vectors.connect().open_table(previous.table)
    except (OSError, RuntimeError, ValueError, FileNotFoundError):
        return "the earlier table is gone"
    if table.version != previous.table_version:
        return f"the table moved on since (v{table.version}, the index record has v{previous.table_version})"
    return previous, before, table


def _overwrite(store: ObjectStore, spec: DatasetSpec, embeddings: EmbeddingSet, dataset: DatasetVersion, name: str,
               vectors: VectorStore, ladder: Ladder, log: Any, why: str) -> Outcome:
    """Every row rewritten as a new table version; the ladder climbed when the set is large."""
    metadata = metadata_columns(spec)
    schema, batches = table_batches(store, spec, embeddings, dataset, metadata)
    wanted = sample_rows(embeddings.rows, spec.index.recall_sample)
    queries: list[np.ndarray] = []
    query_ids: list[Any] = []
    seen = 0

    def collecting() -> Iterator[pa.RecordBatch]:
        nonlocal seen
        for batch in batches:
            lo, hi = np.searchsorted(wanted, [seen, seen + batch.num_rows])
            if hi > lo:
                rows = pa.array(wanted[lo:hi] - seen)
                queries.append(arrow_to_vectors(batch.column(VECTOR).take(rows)))
                query_ids.extend(batch.column(ID).take(rows).to_pylist())
            seen += batch.num_rows
            yield batch

    try:
        db = vectors.connect()
        table = db.create_table(name, pa.RecordBatchReader.from_batches(schema, collecting()), mode="overwrite")
    except (OSError, RuntimeError, ValueError) as exc:
        raise LifecycleError(f"vector store {vectors.uri}: cannot write table {name!r} ({exc})") from exc
    q = np.vstack(queries) if queries else np.empty((0, EMBED_DIM), np.float32)
    rs = RecallSet.empty(query_ids, q, min(spec.index.k, embeddings.rows)).add(vector_chunks(store, embeddings.parts))
    out = Outcome(table, "overwrite", embeddings.rows, "exact", f"overwrite ({why})", 0, "exact", {}, (1.0, 0.0, 0.0),
                  rs)
    if embeddings.rows >= spec.index.ann_min_rows:
        _rebuild(out, spec, ladder, log, "built", "fresh table")
    else:
        out.reason += f"; {embeddings.rows} rows < ann_min_rows: exact search"
        out.measured = measure(table, rs.queries, rs.truth(), rs.k, {}, rs.ids)
    return out


def _append(store: ObjectStore, spec: DatasetSpec, embeddings: EmbeddingSet, dataset: DatasetVersion, base: Base,
            ladder: Ladder, log: Any) -> Outcome | str:
    """Merge the rows added since the base version; extend, rebuild or keep the index exact; a str: overwrite."""
    previous, before, table = base
    new_emb = embeddings.parts[len(before.parts):]
    new_data = dataset.parts[len(before.dataset_parts):]
    view = (embeddings.model_copy(update={"parts": new_emb}), dataset.model_copy(update={"parts": new_data}))
    schema, batches = table_batches(store, spec, *view, metadata_columns(spec))
    if schema != table.schema:
        return "the table's schema differs from the new rows'"
    try:
        merged = (table.merge_insert(ID).when_matched_update_all().when_not_matched_insert_all()
                  .execute(pa.RecordBatchReader.from_batches(schema, batches)))
    except (OSError, RuntimeError, ValueError) as exc:
        raise LifecycleError(f"{previous.uri}: cannot merge into table {previous.table!r} ({exc})") from exc
    if table.count_rows() != embeddings.rows:
        return f"the merged table holds {table.count_rows()} rows, the set {embeddings.rows}"
    k = min(spec.index.k, embeddings.rows)
    rs = load_recall_set(store, recall_key(spec.name, previous.id))
    if rs is None or rs.k != k:  # no carried truth: sample afresh over the whole set
        rs = fresh_recall_set(store, embeddings, spec.index.recall_sample, k)
    else:
        rs.add(vector_chunks(store, new_emb))
    added = int(merged.num_inserted_rows + merged.num_updated_rows)
    out = Outcome(table, "merge_insert", added, "exact", f"merged {added} new rows", previous.trained_rows,
                  previous.index_type, {}, (1.0, 0.0, 0.0), rs)
    rows = embeddings.rows
    if previous.index_type == "exact":
        if rows >= spec.index.ann_min_rows:
            return _rebuild(out, spec, ladder, log, "built", f"{rows} rows reached ann_min_rows")
        out.reason += f"; {rows} rows < ann_min_rows: exact search"
        out.measured = measure(table, rs.queries, rs.truth(), k, {}, rs.ids)
        return out
    trained = previous.trained_rows or previous.rows
    share = 1 - trained / rows
    if share > spec.index.rebuild_unindexed_fraction:
        return _rebuild(out, spec, ladder, log, "rebuilt", f"{share:.1%} of rows are newer than the index's "
                        f"training (> rebuild_unindexed_fraction {spec.index.rebuild_unindexed_fraction})")
    start = time.perf_counter()
    how = extend_index(table)
    seconds = time.perf_counter() - start
    out.query = dict(previous.index_params.get("query") or {})
    out.measured = measure(table, rs.queries, rs.truth(), k, out.query, rs.ids)
    out.tried.append({"index_type": previous.index_type, "build": "extended", "query": out.query,
                      "recall": round(out.measured[0], 4), "p50_ms": round(out.measured[1], 3),
                      "p95_ms": round(out.measured[2], 3), "build_s": round(seconds, 2)})
    if out.measured[0] < spec.index.target_recall:
        return _rebuild(out, spec, ladder, log, "rebuilt", f"recall {out.measured[0]:.3f} after extending < target")
    out.action, out.trained_rows = "extended", trained
    out.reason += f"; extended the {previous.index_type} index by {how} ({share:.1%} of rows newer than its training)"
    return out


def _rebuild(out: Outcome, spec: DatasetSpec, ladder: Ladder, log: Any, action: IndexAction, why: str) -> Outcome:
    """Climb the ladder on the whole table; exact search (index dropped) when no setting reaches the target."""
    rs = out.recall
    chosen = climb_ladder(out.table, ladder, rs.queries, rs.ids, rs.truth(), rs.k, spec.index.target_recall,
                           out.tried, log)
    if chosen is None:
        for built in out.table.list_indices():
            out.table.drop_index(built.name)
        out.action, out.index_type, out.query, out.trained_rows = "exact", "exact", {}, 0
        out.measured = measure(out.table, rs.queries, rs.truth(), rs.k, {}, rs.ids)
        out.reason += f"; {why}: no ANN setting reached recall {spec.index.target_recall}, exact search"
    else:
        out.index_type, out.query, out.measured = chosen
        out.action, out.trained_rows = action, out.table.count_rows()
        out.reason += f"; {why}: {action} {out.index_type}"
    return out


def index_available(vectors: VectorStore, record: IndexVersion) -> bool:
    """Whether a stored IndexVersion still points at a table version that exists in this store."""
    if record.uri != vectors.uri:
        return False
    try:
        table = vectors.connect().open_table(record.table)
        return any(v["version"] == record.table_version for v in table.list_versions())
    except (OSError, RuntimeError, ValueError, FileNotFoundError):
        return False


def artifact_key(dataset: str) -> str:
    return "index-" + re.sub(r"[^a-z0-9-]", "-", dataset.lower())


@task(name="build-index", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error,
      tags=["lifecycle", "index"])
def index_task(store: ObjectStore, spec: DatasetSpec, embeddings: EmbeddingSet, vectors: VectorStore,
               record_id: str | None = None, previous: IndexVersion | None = None) -> IndexVersion:
    """Prefect wrapper: builds the table version and publishes recall/latency as a markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    logger = get_run_logger()
    record = build_index(store, spec, embeddings, vectors, record_id, log=logger, previous=previous)
    logger.info("index %s: %s (%s, %s), %d rows (+%d), recall@%d %.3f, p50 %.2f ms", record.table, record.index_type,
                record.write, record.index_reason, record.rows, record.added_rows, record.k, record.recall_at_k,
                record.p50_ms)
    create_markdown_artifact(index_markdown(record), key=artifact_key(spec.name),
                             description=f"Recall and latency of {record.table} v{record.table_version}")
    return record
