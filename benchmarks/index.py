"""The index stage on N×384 clustered vectors: build time, recall@10 against exact numpy search, latency.

What is measured is the product, not a side script: the vectors are written to a temporary store as
the embed stage writes them (a DatasetVersion + an EmbeddingSet of Parquet parts), and
`tasks.lancedb_index.build_index` builds the table with its ANN ladder exactly as the index stage does.
Then held-out queries (fresh points of the same clusters, not in the table) go through
`lifecycle.search.Searcher` with the query settings the stage chose, and their top 10 are compared with
exact cosine search in numpy over all N vectors.

Data: `clusters` centres drawn from N(0, I) (default one per 1,000 rows), each row a centre plus
`noise`·N(0, I) (default 0.3), normalised to unit length. Clusters are well separated; inside one the
neighbours are only moderately closer than the rest, which is the hard part for quantised indexes.

    python -m benchmarks.index [--rows 1000000] [--queries 200]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time

import numpy as np

from benchmarks.harness import record

DIM = 384
K = 10


def clustered_vectors(rows: int, clusters: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(rows, 384) unit float32 vectors around `clusters` centres, and the centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM), dtype=np.float32)
    out = np.empty((rows, DIM), dtype=np.float32)
    step = 100_000
    for start in range(0, rows, step):  # in chunks: no second full-size temporary
        stop = min(start + step, rows)
        block = centres[rng.integers(0, clusters, stop - start)]
        block += noise * rng.standard_normal((stop - start, DIM), dtype=np.float32)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out, centres


def held_out(centres: np.ndarray, n: int, noise: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = centres[rng.integers(0, len(centres), n)] + noise * rng.standard_normal((n, DIM), dtype=np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row numbers of the exact k nearest (cosine = dot on unit vectors), in chunks of the corpus."""
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.empty((len(queries), 0), dtype=np.int64)
    for start in range(0, len(vectors), 200_000):
        s = queries @ vectors[start:start + 200_000].T
        cat_s = np.hstack([best_s, s])
        cat_i = np.hstack([best_i, np.broadcast_to(np.arange(start, start + s.shape[1]), s.shape)])
        top = np.argpartition(-cat_s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cat_s, top, 1), np.take_along_axis(cat_i, top, 1)
    return best_i


def write_stage_outputs(store, vectors: np.ndarray, part_rows: int):
    """A DatasetVersion and an EmbeddingSet in `store`, laid out as ingest and embed write them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lifecycle.records import DatasetVersion, EmbeddingSet
    from tasks.embeddings import vectors_to_arrow
    from tasks.records import save_record

    def put(key: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        store.write_bytes(key, buf.getvalue())

    rows = len(vectors)
    ids = np.arange(rows, dtype=np.int64)
    data_parts, emb_parts = [], []
    for start in range(0, rows, 250_000):  # ingest's ROWS_PER_PART
        part = ids[start:start + 250_000]
        data_parts.append(f"datasets/bench/v1/part-{len(data_parts):05d}.parquet")
        put(data_parts[-1], pa.table({"rid": part, "label": [f"c{i % 7}" for i in part],
                                      "channel": [("chat", "email")[i % 2] for i in part],
                                      "body": [f"doc {i}" for i in part]}))
    for start in range(0, rows, part_rows):  # embed's rows_per_task
        stop = min(start + part_rows, rows)
        emb_parts.append(f"embeddings/bench/e1/part-{len(emb_parts):05d}.parquet")
        put(emb_parts[-1], pa.table({"id": ids[start:stop], "vector": vectors_to_arrow(vectors[start:stop]),
                                     "text_hash": pa.array(np.zeros(stop - start, np.int64))}))
    dataset = DatasetVersion(id="v1", dataset="bench", source="synthetic", path="datasets/bench/v1", parts=data_parts,
                             rows=rows, bytes=0, spec_hash="bench",
                             schema={"rid": "int64", "label": "string", "channel": "string", "body": "string"})
    save_record(store, dataset)
    return EmbeddingSet(id="e1", dataset="bench", dataset_version="v1", model="synthetic", dim=DIM, rows=rows,
                        parts=emb_parts, encoded_rows=rows)


# The earlier ladder (IVF_HNSW_SQ first), kept to measure the change against.
HNSW_FIRST = (
    ("ivf_hnsw_sq", {}, ({}, {"refine_factor": 5}, {"refine_factor": 10, "ef": 200})),
    ("ivf_pq", {}, ({"refine_factor": 10}, {"nprobes": 50, "refine_factor": 20},
                    {"nprobes": 100, "refine_factor": 50})),
)


class _Log:
    @staticmethod
    def info(msg: str, *args) -> None:
        print("  " + msg % args, flush=True)

    warning = info


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--clusters", type=int, default=None, help="default rows // 1000")
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--queries", type=int, default=200, help="held-out queries")
    parser.add_argument("--part-rows", type=int, default=10_000, help="rows per embedding part")
    parser.add_argument("--note", default="", help="appended to every figure's name (e.g. 'tuned ladder')")
    parser.add_argument("--keep", action="store_true", help="keep the temporary store")
    parser.add_argument("--no-record", action="store_true", help="print only (exploratory runs)")
    parser.add_argument("--ladder", choices=["product", "hnsw-first"], default="product",
                        help="the stage's ANN_LADDER, or the earlier IVF_HNSW_SQ-first ladder")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from infra_blocks import ObjectStore, VectorStore
    from lifecycle.search import Searcher
    from lifecycle.spec import DatasetSpec
    from tasks.lancedb_index import ANN_LADDER, build_index

    clusters = args.clusters or max(10, args.rows // 1000)
    size = f"{args.rows / 1e6:g}M" if args.rows >= 1_000_000 else f"{args.rows // 1000}k"
    label = (f"{size}×{DIM}, {clusters} clusters, noise {args.noise}, ladder {args.ladder}"
             + (f", {args.note}" if args.note else ""))
    root = tempfile.mkdtemp(prefix="bench-index-")
    try:
        t0 = time.perf_counter()
        vectors, centres = clustered_vectors(args.rows, clusters, args.noise)
        store = ObjectStore(url=f"file://{root}/lake")
        embeddings = write_stage_outputs(store, vectors, args.part_rows)
        print(f"data: {label} written in {time.perf_counter() - t0:.1f} s", flush=True)
        spec = DatasetSpec(name="bench", source="synthetic", id_column="rid", label_column="label",
                           task="multiclass", categorical_features=["channel"], text_column="body",
                           index={"k": K})
        vstore = VectorStore(uri=f"{root}/lancedb")
        t0 = time.perf_counter()
        ladder = ANN_LADDER if args.ladder == "product" else HNSW_FIRST
        rec = build_index(store, spec, embeddings, vstore, ladder=ladder, log=_Log())
        build_s = time.perf_counter() - t0
        ann_build = next((t["build_s"] for t in rec.index_params["tried"] if t.get("index_type") == rec.index_type
                          and "build_s" in t), 0.0)
        print(f"build_index: {build_s:.1f} s ({rec.index_type} {rec.index_params['query']}, "
              f"ANN build {ann_build:.1f} s), stage recall@{rec.k} {rec.recall_at_k}", flush=True)

        queries = held_out(centres, args.queries, args.noise)
        t0 = time.perf_counter()
        truth = exact_top_k(vectors, queries, K)
        exact_ms = (time.perf_counter() - t0) * 1000 / len(queries)
        searcher = Searcher.from_record(rec, vstore)
        for q in queries[:10]:  # warm the table's caches, as a serving process would be
            searcher.search_vector(q, k=K)
        hits, latency = [], []
        for q in queries:
            t = time.perf_counter()
            rows = searcher.search_vector(q, k=K)
            latency.append((time.perf_counter() - t) * 1000)
            hits.append([r["id"] for r in rows])
        recall = float(np.mean([len(set(h) & set(t.tolist())) / K for h, t in zip(hits, truth)]))
        p50, p95 = np.percentile(latency, [50, 95])
        print(f"held-out recall@{K} {recall:.4f}, p50 {p50:.2f} ms, p95 {p95:.2f} ms "
              f"(numpy exact {exact_ms:.1f} ms/query, batched)", flush=True)

        if args.no_record:
            return
        setting = f"{rec.index_type} {rec.index_params['query'] or ''}".strip()
        record(f"index.build_index ({label}) [{setting}]", build_s, "s", higher_is_better=False,
               goal="finishes in ~10 min on 2 cores")
        record(f"index.ann_build ({label}) [{setting}]", ann_build, "s", higher_is_better=False)
        record(f"index.recall@10 held-out ({label}) [{setting}]", recall, "recall", goal="≥ 0.95")
        record(f"index.recall@10 stage sample ({label}) [{setting}]", rec.recall_at_k, "recall", goal="≥ 0.95")
        record(f"index.search p50 ({label}) [{setting}]", float(p50), "ms", higher_is_better=False,
               baseline="numpy exact, batched, per query", baseline_value=exact_ms, goal="≤ 5 ms")
        record(f"index.search p95 ({label}) [{setting}]", float(p95), "ms", higher_is_better=False)
        for t in rec.index_params["tried"]:
            print("  tried:", t)
    finally:
        if args.keep:
            print("kept", root)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
