"""Index: an embedding set → a LanceDB table version, tagged with its dataset version, recall measured.

Why this shape:
- One table per dataset, rewritten in overwrite mode: every build is a new table *version*, and the
  version is tagged `ds-<dataset version>`, so the index of any earlier dataset version stays
  queryable (time travel by tag) while the latest is what `open_table` gives by default.
- Rows are streamed part by part (dataset part + its embedding parts, which are in the same row order),
  so memory holds one part, never the whole set.
- ANN indexes are not trusted blindly (IVF_PQ defaults reach recall@10 of 0.13 on clustered data):
  below `ann_min_rows` the table is searched exactly; above it the ladder below is tried in order, each
  setting's recall@k measured on sampled queries against exact numpy search, and the first setting that
  meets `target_recall` is kept. If none does, the index is dropped and search stays exact.
- Recall is measured leave-one-out: each sampled row is a query and does not count as its own
  neighbour. A row finding itself at distance 0 is easy for any index and flatters it (IVF_PQ +
  refine_factor 10 scored 0.976 that way on clustered vectors and 0.23 on fresh queries).
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
from collections.abc import Iterator, Sequence
from typing import Any

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
from tasks.policies import retry_unless_user_error
from tasks.records import load_record

RESERVED = {ID, VECTOR, TEXT, "_distance", "_rowid"}
TIE_TOLERANCE = 1e-5
# (index type, build parameters, query settings to try in order). Building is the costly step, so each
# type is built once and its query settings (nprobes, refine_factor, ef) are what the ladder walks.
# `num_partitions: "sqrt"` means round(sqrt(rows)) partitions (~1,000 rows each at 1M rows).
Ladder = Sequence[tuple[IndexType, dict[str, Any], Sequence[dict[str, int]]]]
ANN_LADDER: Ladder = (
    ("ivf_flat", {"num_partitions": "sqrt"}, ({"nprobes": 3}, {"nprobes": 5}, {"nprobes": 10}, {"nprobes": 20},
                                              {"nprobes": 50})),
    ("ivf_hnsw_sq", {}, ({}, {"refine_factor": 5}, {"refine_factor": 10, "ef": 200})),
    ("ivf_pq", {}, ({"refine_factor": 10}, {"nprobes": 50, "refine_factor": 20},
                    {"nprobes": 100, "refine_factor": 50})),
)


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


def _cosine(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    qn = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    vn = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return 1.0 - qn @ vn.T


def exact_neighbours(chunks: Iterator[tuple[np.ndarray, np.ndarray]], queries: np.ndarray, k: int,
                     keep: int | None = None, exclude: Sequence[Any] | None = None) -> list[set[Any]]:
    """The true k nearest ids of each query (cosine), streaming over (ids, vectors) chunks.

    Ids tied with the k-th distance all count as true neighbours: duplicate texts give identical
    vectors, and which of them an exact search returns is arbitrary.

    Args:
        exclude: Per query, an id that is not a neighbour of it (the query's own row, leave-one-out).
    """
    keep = keep or 4 * k
    best_d = np.full((len(queries), 0), np.inf, dtype=np.float64)
    best_id = np.empty((len(queries), 0), dtype=object)
    own = None if exclude is None else np.asarray(list(exclude), dtype=object)[:, None]
    for ids, vectors in chunks:
        d = _cosine(queries.astype(np.float64), vectors.astype(np.float64))
        if own is not None:
            d[np.asarray(ids, dtype=object)[None, :] == own] = np.inf
        cat_d = np.hstack([best_d, d])
        cat_id = np.hstack([best_id, np.broadcast_to(np.asarray(ids, dtype=object), d.shape)])
        if cat_d.shape[1] > keep:
            top = np.argpartition(cat_d, keep - 1, axis=1)[:, :keep]
            cat_d, cat_id = np.take_along_axis(cat_d, top, 1), np.take_along_axis(cat_id, top, 1)
        best_d, best_id = cat_d, cat_id
    truth: list[set[Any]] = []
    for d, ids in zip(best_d, best_id):
        finite = np.isfinite(d)
        d, ids = d[finite], ids[finite]
        if not len(d):
            truth.append(set())
            continue
        kth = np.sort(d)[min(k, len(d)) - 1]
        truth.append({i for i, di in zip(ids, d) if di <= kth + TIE_TOLERANCE})
    return truth


def recall_at_k(results: list[list[Any]], truth: list[set[Any]], k: int) -> float:
    """Mean share of each query's first k results that are true neighbours."""
    pairs = [(r, t) for r, t in zip(results, truth) if t]
    if not pairs:
        return 1.0
    return float(np.mean([min(len(set(r[:k]) & t), k) / min(k, len(t)) for r, t in pairs]))


def measure(table: Any, queries: np.ndarray, truth: list[set[Any]], k: int, params: dict[str, int],
            exclude: Sequence[Any] | None = None) -> tuple[float, float, float]:
    """recall@k, p50 and p95 latency (ms) of a query setting on the table.

    With `exclude` (each query's own id), k + 1 rows are fetched and the query's own row is dropped.
    """
    results, latency = [], []
    limit = k + (exclude is not None)
    for n, q in enumerate(queries):
        query = (table.search(q, vector_column_name=VECTOR).distance_type(DISTANCE).limit(limit)
                 .select([ID, "_distance"]))
        for name, value in params.items():
            query = getattr(query, name)(value)
        start = time.perf_counter()
        out = query.to_arrow()
        latency.append((time.perf_counter() - start) * 1000)
        ids = out.column(ID).to_pylist()
        results.append([i for i in ids if i != exclude[n]][:k] if exclude is not None else ids)
    return recall_at_k(results, truth, k), float(np.percentile(latency, 50)), float(np.percentile(latency, 95))


def index_config(index_type: str, build: dict[str, Any], rows: int) -> Any:
    """The LanceDB index config of a ladder rung (`num_partitions: "sqrt"` resolved for `rows`)."""
    from lancedb.index import IvfFlat, IvfHnswSq, IvfPq

    params = dict(build)
    if params.get("num_partitions") == "sqrt":
        params["num_partitions"] = max(1, round(rows ** 0.5))
    return {"ivf_flat": IvfFlat, "ivf_hnsw_sq": IvfHnswSq, "ivf_pq": IvfPq}[index_type](distance_type=DISTANCE,
                                                                                      **params)


def sample_rows(rows: int, sample: int, seed: int = 0) -> np.ndarray:
    """Global row numbers of the recall queries: fixed for a given size, so runs compare."""
    return np.sort(np.random.default_rng(seed).choice(rows, size=min(sample, rows), replace=False))


def build_index(store: ObjectStore, spec: DatasetSpec, embeddings: EmbeddingSet, vectors: VectorStore,
                record_id: str | None = None, ladder: Ladder = ANN_LADDER, log: Any = None) -> IndexVersion:
    """Write the embedding set as a new version of the dataset's table, index it if large, tag it.

    Raises:
        LifecycleError: missing columns, misaligned embeddings, or an unreachable vector store.
    """
    dataset = load_record(store, DatasetVersion, embeddings.dataset_version)
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

    name = vectors.table_name(spec.name)
    try:
        db = vectors.connect()
        table = db.create_table(name, pa.RecordBatchReader.from_batches(schema, collecting()), mode="overwrite")
    except (OSError, RuntimeError, ValueError) as exc:
        raise LifecycleError(f"vector store {vectors.uri}: cannot write table {name!r} ({exc})") from exc
    q = np.vstack(queries) if queries else np.empty((0, EMBED_DIM), np.float32)
    k = min(spec.index.k, embeddings.rows)
    chunks = ((t.column(ID).to_pylist(), arrow_to_vectors(t.column(VECTOR)))
              for t in _open_parts(store, embeddings.parts, [ID, VECTOR]))
    truth = exact_neighbours(chunks, q, k, exclude=query_ids)
    tried: list[dict[str, Any]] = []
    chosen = None
    if embeddings.rows >= spec.index.ann_min_rows:
        chosen = _climb_ladder(table, ladder, q, query_ids, truth, k, spec.index.target_recall, tried, log)
        if chosen is None:
            for built in table.list_indices():
                table.drop_index(built.name)
    if chosen is None:
        index_type: IndexType = "exact"
        query_params: dict[str, int] = {}
        recall, p50, p95 = measure(table, q, truth, k, {}, query_ids)
    else:
        index_type, query_params, (recall, p50, p95) = chosen
    tag = dataset_tag(dataset.id)
    if tag in table.tags.list():
        table.tags.update(tag, table.version)
    else:
        table.tags.create(tag, table.version)
    return IndexVersion(
        id=record_id or index_record_id(spec, embeddings, vectors), dataset=spec.name,
        code_version=code_version(sys.modules[__name__]),
        inputs={"embeddings": embeddings.id, "dataset": dataset.id}, dataset_version=dataset.id,
        embedding_set=embeddings.id, uri=vectors.uri, table=name, table_version=table.version, tag=tag,
        index_type=index_type, rows=embeddings.rows, k=k, recall_at_k=round(recall, 4),
        p50_ms=round(p50, 3), p95_ms=round(p95, 3),
        index_params={"distance_type": DISTANCE, "query": query_params, "tried": tried,
                      "target_recall": spec.index.target_recall, "queries": len(q),
                      "recall_method": "leave-one-out", "max_chars": spec.embed.max_chars},
    )


def _climb_ladder(table: Any, ladder: Ladder, queries: np.ndarray, query_ids: list[Any], truth: list[set[Any]],
                  k: int, target: float, tried: list[dict[str, Any]], log: Any) -> tuple[IndexType, dict, tuple] | None:
    """Build each index type in turn and return the first (type, query params, measures) meeting target."""
    rows = table.count_rows()
    for index_type, build, settings in ladder:
        start = time.perf_counter()
        try:
            table.create_index(VECTOR, config=index_config(index_type, build, rows), replace=True)
        except (RuntimeError, ValueError, OSError) as exc:  # e.g. too few rows to train PQ codebooks
            tried.append({"index_type": index_type, "build": dict(build), "error": str(exc).splitlines()[0][:200]})
            continue
        built = time.perf_counter() - start
        if log:
            log.info("index %s %s: built in %.1f s", index_type, build or "defaults", built)
        for params in settings:
            measured = measure(table, queries, truth, k, params, query_ids)
            tried.append({"index_type": index_type, "build": dict(build), "query": dict(params),
                          "recall": round(measured[0], 4), "p50_ms": round(measured[1], 3),
                          "p95_ms": round(measured[2], 3), "build_s": round(built, 2)})
            if log:
                log.info("index %s %s: recall@%d %.3f, p50 %.2f ms", index_type, params, k, *measured[:2])
            if measured[0] >= target:
                return index_type, dict(params), measured
    if log:
        log.warning("index: no ANN setting reached recall %.3f; the table stays exact", target)
    return None


def index_available(vectors: VectorStore, record: IndexVersion) -> bool:
    """Whether a stored IndexVersion still points at a table version that exists in this store."""
    if record.uri != vectors.uri:
        return False
    try:
        table = vectors.connect().open_table(record.table)
        return any(v["version"] == record.table_version for v in table.list_versions())
    except (OSError, RuntimeError, ValueError, FileNotFoundError):
        return False


def index_markdown(record: IndexVersion) -> str:
    """The Prefect artifact: what was built and how well it searches."""
    lines = [
        f"# Index {record.table} v{record.table_version} (tag `{record.tag}`)",
        "",
        "| rows | index | recall@k | k | p50 ms | p95 ms |",
        "|---:|---|---:|---:|---:|---:|",
        f"| {record.rows} | {record.index_type} {record.index_params.get('query') or ''} | {record.recall_at_k:.3f} "
        f"| {record.k} | {record.p50_ms:.2f} | {record.p95_ms:.2f} |",
    ]
    tried = record.index_params.get("tried") or []
    if tried:
        lines += ["", "Settings tried (first to reach the target is kept):", "",
                  "| index | query | recall | p50 ms |", "|---|---|---:|---:|"]
        lines += [f"| {t['index_type']} | {t['query']} | {t['recall']:.3f} | {t['p50_ms']:.2f} |" if "recall" in t
                  else f"| {t['index_type']} | build failed: {t['error']} | | |" for t in tried]
    return "\n".join(lines)


def artifact_key(dataset: str) -> str:
    return "index-" + re.sub(r"[^a-z0-9-]", "-", dataset.lower())


@task(name="build-index", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error,
      tags=["lifecycle", "index"])
def index_task(store: ObjectStore, spec: DatasetSpec, embeddings: EmbeddingSet, vectors: VectorStore,
               record_id: str | None = None) -> IndexVersion:
    """Prefect wrapper: builds the table version and publishes recall/latency as a markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    logger = get_run_logger()
    record = build_index(store, spec, embeddings, vectors, record_id, log=logger)
    logger.info("index %s: %s, %d rows, recall@%d %.3f, p50 %.2f ms", record.table, record.index_type, record.rows,
                record.k, record.recall_at_k, record.p50_ms)
    create_markdown_artifact(index_markdown(record), key=artifact_key(spec.name),
                             description=f"Recall and latency of {record.table} v{record.table_version}")
    return record
