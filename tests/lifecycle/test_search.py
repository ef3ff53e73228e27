"""Search: sample queries find their category, filters apply, old table versions stay reachable by tag."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from infra_blocks import ObjectStore, VectorStore
from lifecycle.errors import LifecycleError
from lifecycle.sample import generate_tickets, write_sample
from lifecycle.search import Searcher
from lifecycle.spec import load_spec
from tasks.embeddings import embed_dataset
from tasks.ingest import ingest_dataset, read_dataset
from tasks.lancedb_index import build_index
from tasks.records import save_record


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, local_compute):
    """The 600-row sample embedded on the cluster and indexed (exact at this size)."""
    root = tmp_path_factory.mktemp("search")
    _, spec_path = write_sample(root / "raw", rows=600)
    spec = load_spec(spec_path)
    store = ObjectStore(url=f"file://{root / 'lake'}")
    vectors = VectorStore(uri=str(root / "lancedb"))
    dataset = ingest_dataset(store, spec)
    save_record(store, dataset)
    embeddings = embed_dataset(store, spec, dataset, local_compute)
    record = build_index(store, spec, embeddings, vectors)
    return store, spec, vectors, embeddings, record, Searcher.from_record(record, vectors)


@pytest.mark.parametrize(
    ("query", "category"),
    [
        ("refund for my invoice", "billing"),
        ("app crashes with error", "technical"),
        ("cannot login password", "account"),
        ("package delivery delayed", "shipping"),
    ],
)
def test_queries_find_their_category(indexed, query, category):
    hits = indexed[-1].search(query, k=5)
    assert len(hits) == 5
    assert sum(h["metadata"]["category"] == category for h in hits) >= 4, hits
    distances = [h["_distance"] for h in hits]
    assert distances == sorted(distances) and 0 <= distances[0] < 1
    assert set(hits[0]) == {"id", "text", "metadata", "_distance"}
    assert set(hits[0]["metadata"]) == {"category", "channel", "plan"}


def test_a_bfloat16_query_encoder_finds_what_float32_finds(indexed):
    """serving's search_precision "auto" runs queries in bfloat16 on AMX CPUs: same vectors to within
    cosine 0.999, the same nearest row for every query, and (almost) the same top 5."""
    store, spec, vectors, embeddings, record, exact = indexed
    half = Searcher.from_record(record, vectors, precision="bfloat16")
    queries = generate_tickets(40, seed=11)["text"].astype(str).tolist() + ["refund", "", "x" * 3000]
    a, b = exact.embed_many(queries), half.embed_many(queries)
    assert b.dtype == np.float32 and np.allclose(np.linalg.norm(b, axis=1), 1, atol=1e-5)
    assert (a * b).sum(axis=1).min() > 0.999
    ids = [[[h["id"] for h in hits] for hits in s.search_vectors(v, k=5)] for s, v in ((exact, a), (half, b))]
    assert [top[0] for top in ids[0]] == [top[0] for top in ids[1]]
    assert np.mean([len(set(x) & set(y)) / 5 for x, y in zip(*ids)]) >= 0.95
    with pytest.raises(ValueError, match="precision"):
        Searcher.from_record(record, vectors, precision="float16")


def test_index_of_the_sample_is_exact_with_full_recall(indexed):
    record = indexed[4]
    assert (record.index_type, record.recall_at_k, record.rows, record.k) == ("exact", 1.0, 600, 10)
    assert record.tag == f"ds-{record.dataset_version}" and record.p95_ms >= record.p50_ms > 0


def test_where_filters_before_ranking_and_bad_input_is_one_line(indexed):
    searcher = indexed[-1]
    hits = searcher.search("refund for my invoice", k=7, where="channel = 'phone' AND category = 'billing'")
    assert len(hits) == 7
    assert {(h["metadata"]["channel"], h["metadata"]["category"]) for h in hits} == {("phone", "billing")}
    with pytest.raises(LifecycleError, match="invalid filter"):
        searcher.search("refund", where="no_such_column = 1")
    with pytest.raises(LifecycleError, match="k must be between"):
        searcher.search("refund", k=0)
    with pytest.raises(LifecycleError, match="no index table"):
        Searcher(indexed[2].uri, "missing")


def test_empty_long_and_non_text_queries(indexed):
    searcher = indexed[-1]
    assert len(searcher.search("", k=3)) == 3  # the empty text's neighbours: defined, if not useful
    long = searcher.search("refund for my invoice " * 5000, k=5)  # cut to max_chars, not an error
    assert sum(h["metadata"]["category"] == "billing" for h in long) >= 4
    np.testing.assert_allclose(searcher.embed("x" * 50_000), searcher.embed("x" * searcher.max_chars), atol=1e-5)
    with pytest.raises(LifecycleError, match="query must be a string"):
        searcher.search(42)


def test_old_version_stays_queryable_by_tag(indexed, local_compute, tmp_path):
    store, spec, vectors, embeddings, first, _ = indexed
    frame = read_dataset(store, ingest_dataset(store, spec))
    extra = generate_tickets(50, seed=99).assign(ticket_id=np.arange(601, 651), text="refund refund refund")
    path = tmp_path / "more.csv"
    pd.concat([frame, extra[frame.columns]], ignore_index=True).to_csv(path, index=False)
    replace = spec.ingest.model_copy(update={"mode": "replace"})  # the file is a whole new snapshot
    spec2 = spec.model_copy(update={"source": str(path), "ingest": replace})
    dataset2 = ingest_dataset(store, spec2)
    save_record(store, dataset2)
    second = build_index(store, spec2, embed_dataset(store, spec2, dataset2, local_compute, previous=embeddings),
                         vectors)
    assert second.table_version > first.table_version and second.tag != first.tag
    latest = Searcher(vectors.uri, second.table)
    old = Searcher.from_record(first, vectors, by_tag=True)
    assert (latest.rows, old.rows, old.version) == (650, 600, first.table_version)
    assert all(h["id"] <= 600 for h in old.search("refund refund refund", k=10))
    assert any(h["id"] > 600 for h in latest.search("refund refund refund", k=10))
    with pytest.raises(LifecycleError, match="no version or tag"):
        Searcher(vectors.uri, second.table, "ds-nope")
