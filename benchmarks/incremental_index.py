"""What an append costs the embed and index stages: a 1 % landing on a 200k-row table against the same stages cold.

A dataset that grows should cost what it grows by. Both sides run the product functions on one local
Dask cluster and a file lake in a temporary directory, after an untimed ingest of the table:

- `cold`: `embed_dataset` of the whole table version (no earlier set), then `build_index` (overwrite,
  the ANN ladder once the table has `ann_min_rows`, recall measured).
- `append`: a landing of `--fraction` × rows with fresh ids is ingested (untimed, `ingest.mode: append`),
  then `embed_dataset` with the cold set as the previous one (only the landing's rows are encoded, the
  earlier parts referenced) and `build_index` with the cold record as the previous one (`merge_insert`,
  the index extended or rebuilt, recall measured against the carried truth).

Model loading is excluded on both sides (every worker loads the model before the first timed run).
`--encoder stub` replaces the encoder on the workers with a hash of each text → a clustered 384-d
vector (no model): the figure's name then says so, and the ratio measures the stages' own work
without the encoder, where the cold side is much cheaper and the ratio much harder to meet.

    python -m benchmarks.incremental_index [--rows 200000] [--fraction 0.01] [--encoder model|stub]
        [--ann-min-rows N] [--results FILE]

Records `embed+index.incremental (<rows>, <fraction> append[, stub encoder])` with value = append
seconds, baseline = cold seconds and ratio = append / cold (goal ≤ 5 %).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import RESULTS, record_incremental
from benchmarks.ingest import tickets_spec, write_csv

STUB_CLUSTERS = 64


def stub_encode(texts: list[str], device: str = "cpu", batch_size: int = 64, threads: int | None = None) -> np.ndarray:
    """A vector per text without a model: a cluster centre picked by the text's hash, plus noise seeded by it."""
    from lifecycle.encoder import EMBED_DIM
    from tasks.embeddings import text_hashes

    hashes = text_hashes(texts).view(np.uint64)
    centres = np.random.default_rng(0).normal(size=(STUB_CLUSTERS, EMBED_DIM)).astype(np.float32)
    noise = np.stack([np.random.default_rng(int(h)).normal(size=EMBED_DIM) for h in hashes]) if len(texts) else \
        np.empty((0, EMBED_DIM))
    vectors = centres[hashes % STUB_CLUSTERS] + 0.3 * noise.astype(np.float32)
    return np.ascontiguousarray(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), dtype=np.float32)


def _use_stub() -> None:
    from lifecycle import encoder

    encoder.encode = stub_encode  # type: ignore[assignment]


def _warm() -> int:
    from lifecycle import encoder

    return len(encoder.encode(["warm-up"]))


def measure(rows: int, fraction: float, encoder: str, ann_min_rows: int | None, workdir: Path,
            results: Path) -> None:
    from infra_blocks import DaskCompute, ObjectStore, VectorStore
    from infra_blocks.dask_compute import close_local_clusters
    from tasks.embeddings import embed_dataset
    from tasks.ingest import ingest_dataset
    from tasks.lancedb_index import build_index
    from tasks.records import save_record

    table_csv, landing_csv = workdir / "table.csv", workdir / "landing.csv"
    landing_rows = max(1, int(rows * fraction))
    write_csv(table_csv, rows)
    write_csv(landing_csv, landing_rows, first_id=rows + 1)
    spec = tickets_spec(str(table_csv))
    if ann_min_rows is not None:
        spec = spec.model_copy(update={"index": spec.index.model_copy(update={"ann_min_rows": ann_min_rows})})
    store = ObjectStore(url=f"file://{workdir / 'lake'}")
    vectors = VectorStore(uri=str(workdir / "lancedb"))
    compute = DaskCompute(mode="local", n_workers=2, threads_per_worker=1)
    try:
        with compute.get_client() as client:
            if encoder == "stub":
                client.run(_use_stub)
            client.run(_warm)  # model load (or stub import) on every worker, before anything is timed
        table = ingest_dataset(store, spec)
        save_record(store, table)
        t0 = time.perf_counter()
        cold_set = embed_dataset(store, spec, table, compute)
        cold_embed = time.perf_counter() - t0
        save_record(store, cold_set)
        cold_index = build_index(store, spec, cold_set, vectors)
        cold_s = time.perf_counter() - t0
        print(f"cold: embed {cold_embed:.1f} s ({cold_set.encoded_rows} encoded), index {cold_s - cold_embed:.1f} s "
              f"({cold_index.index_action} {cold_index.index_type}, recall {cold_index.recall_at_k})", flush=True)

        grown = ingest_dataset(store, spec.model_copy(update={"source": str(landing_csv)}))
        save_record(store, grown)
        assert grown.rows == rows + landing_rows and grown.parts[:len(table.parts)] == table.parts
        t0 = time.perf_counter()
        new_set = embed_dataset(store, spec, grown, compute, previous=cold_set)
        append_embed = time.perf_counter() - t0
        save_record(store, new_set)
        new_index = build_index(store, spec, new_set, vectors, previous=cold_index)
        append_s = time.perf_counter() - t0
        assert new_set.encoded_rows == landing_rows and new_index.write == "merge_insert", new_index.index_reason
        print(f"append: embed {append_embed:.2f} s ({new_set.encoded_rows} encoded), index "
              f"{append_s - append_embed:.2f} s ({new_index.index_action}: {new_index.index_reason}; "
              f"recall {new_index.recall_at_k})", flush=True)
    finally:
        close_local_clusters()
    tag = f"{rows // 1000}k rows" if rows >= 1000 else f"{rows} rows"
    stub = ", stub encoder: stage work without the model" if encoder == "stub" else ""
    record_incremental("embed+index", tag, fraction, append_s, cold_s, variant=stub, results=results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--fraction", type=float, default=0.01)
    parser.add_argument("--encoder", choices=["model", "stub"], default="model")
    parser.add_argument("--ann-min-rows", type=int, default=None, help="default: the spec's")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON-lines file the figure is appended to.")
    args = parser.parse_args()
    for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "OMP_WAIT_POLICY": "PASSIVE"}.items():
        os.environ.setdefault(key, value)  # as the CLI sets them, inherited by the workers
    with tempfile.TemporaryDirectory(prefix="bench-incremental-index-") as tmp:
        measure(args.rows, args.fraction, args.encoder, args.ann_min_rows, Path(tmp), args.results)


if __name__ == "__main__":
    main()
