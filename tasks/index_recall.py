"""Recall of a LanceDB table against exact search: the truth, its measurement, and its carry-over.

Why this shape:
- Truth is exact cosine kNN in numpy, streamed over (ids, vectors) chunks, keeping per query only the
  `keep` = 4·k best candidates seen so far. Because the top-`keep` of (old ∪ new) is the top-`keep` of
  (top-`keep` of old ∪ new), those candidates are all an append needs: they are stored beside each
  index version (`RecallSet`), and the next version's truth is the stored one merged with the new
  rows alone. Recall is then measured for every version at a cost that grows with the append, not
  with the table; the query set stays the one sampled at the last full measurement.
- A result counts when its id is a true neighbour or its exact distance is no farther than the k-th
  true one (`Neighbours`): duplicate texts tie, and which tied row is returned is arbitrary.
- Recall is measured leave-one-out: each sampled row is a query and does not count as its own
  neighbour. A row finding itself at distance 0 is easy for any index and flatters it (IVF_PQ +
  refine_factor 10 scored 0.976 that way on clustered vectors and 0.23 on fresh queries).
- The ANN ladder (the index types and query settings tried in order, see tasks/lancedb_index.py for
  why IVF_FLAT comes first) lives here because climbing it is measuring recall.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from infra_blocks import ObjectStore
from lifecycle.encoder import EMBED_DIM
from lifecycle.records import EmbeddingSet, IndexType, IndexVersion
from lifecycle.search import DISTANCE
from tasks.embeddings import ID, VECTOR, arrow_to_vectors, vectors_to_arrow

TIE_TOLERANCE = 1e-5
_NOBODY = object()  # the "own id" of a query that excludes nothing
Chunks = Iterable[tuple[Sequence[Any], np.ndarray]]
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


@dataclass
class RecallSet:
    """Recall queries (sampled rows) and the best `keep` exact candidates of each over the rows seen."""

    ids: list[Any]
    queries: np.ndarray
    best_d: np.ndarray  # (queries, ≤ keep) cosine distances
    best_id: np.ndarray  # (queries, ≤ keep) ids, object dtype
    k: int
    rows: int  # rows the candidates were taken from

    @classmethod
    def empty(cls, ids: list[Any], queries: np.ndarray, k: int) -> RecallSet:
        n = len(ids)
        return cls(ids, queries, np.full((n, 0), np.inf), np.empty((n, 0), dtype=object), k, 0)

    def add(self, chunks: Chunks) -> RecallSet:
        """Merge rows into the candidates (each query's own id excluded): the truth over more rows."""
        keep = 4 * self.k
        own = np.asarray(self.ids, dtype=object)[:, None]
        for ids, vectors in chunks:
            self.rows += len(ids)
            if not len(self.ids):
                continue
            d = _cosine(self.queries.astype(np.float64), vectors.astype(np.float64))
            d[np.asarray(ids, dtype=object)[None, :] == own] = np.inf
            cat_d = np.hstack([self.best_d, d])
            cat_id = np.hstack([self.best_id, np.broadcast_to(np.asarray(ids, dtype=object), d.shape)])
            if cat_d.shape[1] > keep:
                top = np.argpartition(cat_d, keep - 1, axis=1)[:, :keep]
                cat_d, cat_id = np.take_along_axis(cat_d, top, 1), np.take_along_axis(cat_id, top, 1)
            self.best_d, self.best_id = cat_d, cat_id
        return self

    def truth(self) -> list[set[Any]]:
        """The true k nearest ids of each query; ids tied with the k-th distance all count."""
        return _truth(self.best_d, self.best_id, self.k)


def _cosine(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    qn = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    vn = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return 1.0 - qn @ vn.T


class Neighbours(set):
    """A query's true k nearest ids, and the k-th true distance (`kth`): a result at that distance or
    closer is a true neighbour too, even when its id is not among the kept candidates.

    Why the distance: duplicate texts give identical vectors, so one query can have hundreds of rows
    tied at its k-th distance, more than the 4·k candidates kept. Which of them the truth kept, and
    which an index returns, is arbitrary; counting by id alone scored a freshly extended IVF_FLAT
    index 0.870 against 0.979 rebuilt on the same 202k tickets (tiled texts) and forced a rebuild.
    """

    kth: float = np.inf


def _truth(best_d: np.ndarray, best_id: np.ndarray, k: int) -> list[set[Any]]:
    truth: list[set[Any]] = []
    for d, ids in zip(best_d, best_id):
        finite = np.isfinite(d)
        d, ids = d[finite], ids[finite]
        found = Neighbours()
        if len(d):
            found.kth = float(np.sort(d)[min(k, len(d)) - 1])
            found.update(i for i, di in zip(ids, d) if di <= found.kth + TIE_TOLERANCE)
        truth.append(found)
    return truth


def exact_neighbours(chunks: Chunks, queries: np.ndarray, k: int,
                     exclude: Sequence[Any] | None = None) -> list[set[Any]]:
    """The true k nearest ids of each query (cosine), streaming over (ids, vectors) chunks.

    Ids tied with the k-th distance all count as true neighbours: duplicate texts give identical
    vectors, and which of them an exact search returns is arbitrary.

    Args:
        exclude: Per query, an id that is not a neighbour of it (the query's own row, leave-one-out).
    """
    own = list(exclude) if exclude is not None else [_NOBODY] * len(queries)
    return RecallSet.empty(own, queries, k).add(chunks).truth()


def recall_at_k(results: list[list[Any]], truth: list[set[Any]], k: int,
                distances: list[list[float]] | None = None) -> float:
    """Mean share of each query's first k results that are true neighbours: by id, or (given each
    result's exact `distances`) no farther than the query's k-th true distance (`Neighbours.kth`)."""
    scores = []
    for n, (r, t) in enumerate(zip(results, truth)):
        if not t:
            continue
        kth: float | None = getattr(t, "kth", None) if distances is not None else None
        d = distances[n] if distances is not None else [np.inf] * len(r)
        hits = sum(1 for i, di in zip(r[:k], d[:k]) if i in t or (kth is not None and di <= kth + TIE_TOLERANCE))
        scores.append(min(hits, k) / min(k, len(t)))
    return float(np.mean(scores)) if scores else 1.0


def measure(table: Any, queries: np.ndarray, truth: list[set[Any]], k: int, params: dict[str, int],
            exclude: Sequence[Any] | None = None) -> tuple[float, float, float]:
    """recall@k, p50 and p95 latency (ms) of a query setting on the table.

    With `exclude` (each query's own id), k + 1 rows are fetched and the query's own row is dropped.
    """
    results, distances, latency = [], [], []
    limit = k + (exclude is not None)
    for n, q in enumerate(queries):
        query = (table.search(q, vector_column_name=VECTOR).distance_type(DISTANCE).limit(limit)
                 .select([ID, VECTOR, "_distance"]))
        for name, value in params.items():
            query = getattr(query, name)(value)
        start = time.perf_counter()
        out = query.to_arrow()
        latency.append((time.perf_counter() - start) * 1000)
        ids = out.column(ID).to_pylist()
        # Exact distances of what came back (an index's own may be approximate, as PQ's are).
        got = out.column(VECTOR).combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(len(ids), -1)
        exact = _cosine(np.asarray(q, np.float64)[None, :], got.astype(np.float64))[0] if len(ids) else np.empty(0)
        kept = [j for j, i in enumerate(ids) if exclude is None or i != exclude[n]][:k]
        results.append([ids[j] for j in kept])
        distances.append([float(exact[j]) for j in kept])
    if not latency:
        return 1.0, 0.0, 0.0
    return (recall_at_k(results, truth, k, distances), float(np.percentile(latency, 50)),
            float(np.percentile(latency, 95)))


def sample_rows(rows: int, sample: int, seed: int = 0) -> np.ndarray:
    """Global row numbers of the recall queries: fixed for a given size, so runs compare."""
    return np.sort(np.random.default_rng(seed).choice(rows, size=min(sample, rows), replace=False))


def vector_chunks(store: ObjectStore, keys: Sequence[str]) -> Iterator[tuple[list[Any], np.ndarray]]:
    """(ids, vectors) of embedding parts, one part at a time."""
    pafs = store.pyarrow_filesystem()
    for key in keys:
        table = pq.read_table(store.path(key), filesystem=pafs, columns=[ID, VECTOR])
        yield table.column(ID).to_pylist(), arrow_to_vectors(table.column(VECTOR))


def recall_key(dataset: str, record_id: str) -> str:
    return f"index-recall/{dataset}/{record_id}.parquet"


def save_recall_set(store: ObjectStore, key: str, rs: RecallSet) -> None:
    """Store the queries and candidates (~100 queries × 4k candidates: a few hundred KB)."""
    table = pa.table({"id": pa.array(rs.ids), VECTOR: vectors_to_arrow(rs.queries.reshape(-1, EMBED_DIM)),
                      "best_id": pa.array([list(r) for r in rs.best_id]),
                      "best_d": pa.array([list(r) for r in rs.best_d], type=pa.list_(pa.float64()))})
    table = table.replace_schema_metadata({"k": str(rs.k), "rows": str(rs.rows)})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.write_bytes(key, buf.getvalue())


def load_recall_set(store: ObjectStore, key: str) -> RecallSet | None:
    """The stored RecallSet, or None when it is missing or unreadable (then truth is taken afresh)."""
    try:
        table = pq.read_table(store.path(key), filesystem=store.pyarrow_filesystem())
        meta = table.schema.metadata or {}
        k, rows = int(meta[b"k"]), int(meta[b"rows"])
    except (FileNotFoundError, OSError, KeyError, ValueError, pa.ArrowInvalid):
        return None
    best_id = table.column("best_id").to_pylist()
    width = min((len(r) for r in best_id), default=0)
    ids_arr = np.empty((len(best_id), width), dtype=object)
    for i, r in enumerate(best_id):
        ids_arr[i, :] = r[:width]
    best_d = np.array([r[:width] for r in table.column("best_d").to_pylist()], dtype=np.float64).reshape(-1, width)
    return RecallSet(table.column("id").to_pylist(), arrow_to_vectors(table.column(VECTOR)), best_d, ids_arr, k, rows)


def fresh_recall_set(store: ObjectStore, embeddings: EmbeddingSet, sample: int, k: int) -> RecallSet:
    """Queries sampled over the whole set and their truth over all of it (reads every vector once)."""
    wanted = sample_rows(embeddings.rows, sample)
    ids: list[Any] = []
    queries: list[np.ndarray] = []
    seen = 0
    for part_ids, vecs in vector_chunks(store, embeddings.parts):
        lo, hi = np.searchsorted(wanted, [seen, seen + len(part_ids)])
        ids.extend(part_ids[i - seen] for i in wanted[lo:hi])
        queries.append(vecs[wanted[lo:hi] - seen])
        seen += len(part_ids)
    q = np.vstack(queries) if queries else np.empty((0, EMBED_DIM), np.float32)
    return RecallSet.empty(ids, q, k).add(vector_chunks(store, embeddings.parts))


def index_config(index_type: str, build: dict[str, Any], rows: int) -> Any:
    """The LanceDB index config of a ladder rung (`num_partitions: "sqrt"` resolved for `rows`)."""
    from lancedb.index import IvfFlat, IvfHnswSq, IvfPq

    params = dict(build)
    if params.get("num_partitions") == "sqrt":
        params["num_partitions"] = max(1, round(rows ** 0.5))
    return {"ivf_flat": IvfFlat, "ivf_hnsw_sq": IvfHnswSq, "ivf_pq": IvfPq}[index_type](distance_type=DISTANCE,
                                                                                      **params)


def climb_ladder(table: Any, ladder: Ladder, queries: np.ndarray, query_ids: list[Any], truth: list[set[Any]],
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


def index_markdown(record: IndexVersion) -> str:
    """The Prefect artifact: what was built and how well it searches."""
    lines = [
        f"# Index {record.table} v{record.table_version} (tag `{record.tag}`)",
        "",
        f"{record.write}, +{record.added_rows} rows; index {record.index_action}: {record.index_reason}",
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
