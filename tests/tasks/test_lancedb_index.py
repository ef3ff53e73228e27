"""Index: metadata columns, tie-aware exact truth, the ANN ladder on clustered vectors, and its fallback."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infra_blocks import ObjectStore, VectorStore
from lifecycle.errors import LifecycleError
from lifecycle.records import DatasetVersion, EmbeddingSet
from lifecycle.sample import SAMPLE_SPEC
from lifecycle.search import Searcher
from lifecycle.spec import DatasetSpec
from tasks import lancedb_index
from tasks.embeddings import vectors_to_arrow
from tasks.index_recall import RecallSet, exact_neighbours, index_config, recall_at_k
from tasks.lancedb_index import ANN_LADDER, build_index, dataset_tag, index_markdown, metadata_columns
from tasks.records import save_record

DIM = 384


def _spec(**index) -> DatasetSpec:
    return DatasetSpec(name="synth", source="unused.csv", id_column="rid", label_column="label", task="multiclass",
                       categorical_features=["channel"], numeric_features=["score"], text_column="body", index=index)


def test_metadata_columns_default_override_and_reserved():
    spec = DatasetSpec(**{**SAMPLE_SPEC, "source": "x.csv"})
    assert metadata_columns(spec) == ["category", "channel", "plan"]
    custom = spec.model_copy(update={"index": spec.index.model_copy(update={"metadata_columns": ["plan", "text"]})})
    assert metadata_columns(custom) == ["plan"]  # the text column is stored anyway, as `text`
    bad = spec.model_copy(update={"index": spec.index.model_copy(update={"metadata_columns": ["vector"]})})
    with pytest.raises(LifecycleError, match="'vector' is a reserved name"):
        metadata_columns(bad)


def test_exact_neighbours_streams_chunks_and_counts_ties():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(300, 8)).astype(np.float32)
    vectors[7] = vectors[3]  # a duplicate: tied with row 3 for every query
    queries = vectors[[3, 10, 200]]
    chunks = ((list(range(s, min(s + 64, 300))), vectors[s:s + 64]) for s in range(0, 300, 64))
    truth = exact_neighbours(chunks, queries, k=5)
    normed = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    for q, t in zip([3, 10, 200], truth):
        order = np.argsort(1 - normed @ normed[q])[:5]
        assert set(order.tolist()) <= t
    assert {3, 7} <= truth[0] and len(truth[0]) == 5  # both copies count as the nearest
    assert recall_at_k([[3, 7, 1], [0]], [{3, 7, 9}, {1}], k=3) == pytest.approx(0.5 * (2 / 3) + 0.5 * 0)


def test_leave_one_out_truth_skips_each_querys_own_row():
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(200, 8)).astype(np.float32)
    vectors[50] = vectors[40]  # row 40's twin: still a true neighbour when row 40 is the query
    chunks = ((list(range(s, s + 50)), vectors[s:s + 50]) for s in range(0, 200, 50))
    truth = exact_neighbours(chunks, vectors[[40, 7]], k=3, exclude=[40, 7])
    normed = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    assert 40 not in truth[0] and 50 in truth[0] and 7 not in truth[1]
    assert truth[1] == set(np.argsort(1 - normed @ normed[7])[1:4].tolist())
    assert recall_at_k([[1, 2], [3]], [set(), {3}], k=1) == 1.0  # a query with no neighbours is not scored


def test_more_ties_than_candidates_count_by_distance(tmp_path):
    """A query with 100 identical rows (duplicate texts) keeps only 4·k of them as candidates; any of
    the 100 an index returns is a true neighbour, by its exact distance, not by the kept ids."""
    import lancedb

    from tasks.index_recall import measure

    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(400, 8)).astype(np.float32)
    vectors[100:200] = vectors[0]  # row 0 and 100 copies of it
    rs = RecallSet.empty([0], vectors[[0]], k=5).add([(list(range(400)), vectors)])
    (truth,) = rs.truth()
    assert len(truth) == 20 and truth <= set(range(100, 200)) and truth.kth == pytest.approx(0.0, abs=1e-6)
    others = sorted(set(range(100, 200)) - truth)[:5]  # tied rows the truth did not keep
    assert recall_at_k([others], [truth], k=5) == 0.0  # by id alone: the artefact
    assert recall_at_k([others], [truth], k=5, distances=[[0.0] * 5]) == 1.0
    assert recall_at_k([[1, 2, 3, 4, 5]], [truth], k=5, distances=[[0.3] * 5]) == 0.0  # farther: misses

    rows = pa.table({"id": pa.array(range(400), pa.int64()),
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 8)})
    table = lancedb.connect(str(tmp_path / "lancedb")).create_table("ties", rows)
    recall, _, _ = measure(table, vectors[[0]], [truth], 5, {}, [0])
    assert recall == 1.0  # whichever copies exact search returns


def test_ladder_starts_with_ivf_flat_and_resolves_sqrt_partitions():
    assert [rung[0] for rung in ANN_LADDER] == ["ivf_flat", "ivf_hnsw_sq", "ivf_pq"]
    config = index_config("ivf_flat", {"num_partitions": "sqrt"}, 1_000_000)
    assert (type(config).__name__, config.num_partitions, config.distance_type) == ("IvfFlat", 1000, "cosine")
    assert index_config("ivf_pq", {"num_sub_vectors": 48}, 10).num_sub_vectors == 48


def _write_synthetic(store: ObjectStore, rows: int = 5000, name: str = "synth", shuffle_parts: bool = False):
    """A dataset version and an embedding set of clustered vectors, written as the stages write them."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(50, DIM)).astype(np.float32)
    cluster = rng.integers(0, 50, rows)
    vectors = (centers[cluster] + 0.3 * rng.normal(size=(rows, DIM))).astype(np.float32)
    ids = np.arange(10_000, 10_000 + rows, dtype=np.int64)
    data = pa.table({"rid": ids, "label": [f"c{c % 4}" for c in cluster], "score": rng.normal(size=rows),
                     "channel": rng.choice(["chat", "email"], rows), "body": [f"row {i}" for i in ids]})
    key = f"datasets/{name}/v1/part-00000.parquet"
    _put(store, key, data)
    dataset = DatasetVersion(id="v1", dataset=name, source="synthetic", path=f"datasets/{name}/v1", parts=[key],
                             rows=rows, bytes=0, schema={f.name: str(f.type) for f in data.schema}, spec_hash="x")
    save_record(store, dataset)
    parts = []
    for i, start in enumerate(range(0, rows, 2000)):
        stop = min(start + 2000, rows)
        parts.append(f"embeddings/{name}/e1/part-{i:05d}.parquet")
        _put(store, parts[-1], pa.table({"id": ids[start:stop], "vector": vectors_to_arrow(vectors[start:stop])}))
    if shuffle_parts:
        parts = parts[::-1]
    embeddings = EmbeddingSet(id="e1", dataset=name, dataset_version="v1", model="synthetic", dim=DIM, rows=rows,
                              parts=parts, encoded_rows=rows, dataset_parts=[key])
    save_record(store, embeddings)
    return embeddings, vectors, ids


def _put(store: ObjectStore, key: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.write_bytes(key, buf.getvalue())


@pytest.fixture
def vectors_store(tmp_path) -> VectorStore:
    return VectorStore(uri=str(tmp_path / "lancedb"))


def test_ann_index_reaches_the_target_recall(lake, vectors_store):
    embeddings, vectors, ids = _write_synthetic(lake)
    spec = _spec(ann_min_rows=1000, target_recall=0.99, recall_sample=50, k=10)
    record = build_index(lake, spec, embeddings, vectors_store)
    assert record.index_type in ("ivf_flat", "ivf_hnsw_sq", "ivf_pq")
    assert record.recall_at_k >= 0.99 and record.rows == 5000 and record.k == 10
    tried = record.index_params["tried"]
    assert tried[-1]["recall"] == record.recall_at_k and all(t["recall"] < 0.99 for t in tried[:-1])
    assert record.index_params["query"] == tried[-1]["query"]
    assert record.index_params["recall_method"] == "leave-one-out"
    assert 0 < record.p50_ms <= record.p95_ms
    table = vectors_store.connect().open_table("synth")
    names = {"ivf_flat": "IvfFlat", "ivf_hnsw_sq": "IvfHnswSq", "ivf_pq": "IvfPq"}
    assert [i.index_type for i in table.list_indices()] == [names[record.index_type]]
    assert table.tags.list()[record.tag]["version"] == record.table_version
    assert set(table.schema.names) == {"id", "vector", "text", "label", "channel"}
    hits = Searcher.from_record(record, vectors_store).search_vector(vectors[123], k=3)
    assert hits[0]["id"] == ids[123] and hits[0]["text"] == f"row {ids[123]}"
    assert set(hits[0]["metadata"]) == {"label", "channel"}
    assert "recall@k" in index_markdown(record)


def test_no_ann_setting_good_enough_falls_back_to_exact(lake, vectors_store):
    embeddings, _, _ = _write_synthetic(lake, rows=3000)
    spec = _spec(ann_min_rows=1000, target_recall=1.0, recall_sample=30, k=10)
    weak = [("ivf_pq", {}, ({},))]  # PQ without refinement: far below recall 1.0 on this data
    record = build_index(lake, spec, embeddings, vectors_store, ladder=weak)
    assert record.index_type == "exact" and record.recall_at_k == 1.0
    assert [t["index_type"] for t in record.index_params["tried"]] == ["ivf_pq"]
    assert record.index_params["tried"][0]["recall"] < 1.0
    assert list(vectors_store.connect().open_table("synth").list_indices()) == []


def test_small_sets_stay_exact_and_misaligned_embeddings_are_refused(lake, vectors_store):
    embeddings, _, _ = _write_synthetic(lake, rows=1500)
    record = build_index(lake, _spec(recall_sample=20), embeddings, vectors_store)
    assert (record.index_type, record.recall_at_k, record.index_params["tried"]) == ("exact", 1.0, [])
    shuffled, _, _ = _write_synthetic(lake, rows=4500, name="shuffled", shuffle_parts=True)
    spec = _spec().model_copy(update={"name": "shuffled"})
    with pytest.raises(LifecycleError, match="do not line up"):
        build_index(lake, spec, shuffled, vectors_store)


def test_carried_truth_equals_truth_over_all_rows():
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(400, 8)).astype(np.float32)
    ids = list(range(400))
    chunks = [(ids[s:s + 100], vectors[s:s + 100]) for s in range(0, 400, 100)]
    carried = RecallSet.empty([5, 50], vectors[[5, 50]], k=4).add(chunks[:3])  # the earlier version
    carried.add(chunks[3:])  # then only the appended rows
    assert carried.truth() == exact_neighbours(iter(chunks), vectors[[5, 50]], k=4, exclude=[5, 50])
    assert carried.rows == 400


def _append(store: ObjectStore, base: EmbeddingSet, rows: int, version: str, seed: int = 5,
            replace: bool = False) -> EmbeddingSet:
    """A version that appends `rows` clustered rows: one more dataset file, the earlier parts + one new part
    (`replace`: the new file and part alone)."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(0).normal(size=(50, DIM)).astype(np.float32)
    cluster = rng.integers(0, 50, rows)
    vectors = (centers[cluster] + 0.3 * rng.normal(size=(rows, DIM))).astype(np.float32)
    start = 10_000 + base.rows
    ids = np.arange(start, start + rows, dtype=np.int64)
    before = DatasetVersion.model_validate_json(store.read_bytes(f"records/dataset/{base.dataset_version}.json"))
    key = f"datasets/synth/{version}/part-00000.parquet"
    _put(store, key, pa.table({"rid": ids, "label": [f"c{c % 4}" for c in cluster], "score": rng.normal(size=rows),
                               "channel": rng.choice(["chat", "email"], rows), "body": [f"row {i}" for i in ids]}))
    keep = [] if replace else before.parts
    total = rows + (0 if replace else before.rows)
    dataset = before.model_copy(update={"id": version, "parts": [*keep, key], "rows": total})
    save_record(store, dataset)
    part = f"embeddings/synth/e-{version}/part-00000.parquet"
    _put(store, part, pa.table({"id": ids, "vector": vectors_to_arrow(vectors)}))
    emb = base.model_copy(update={"id": f"e-{version}", "dataset_version": version, "rows": dataset.rows,
                                  "parts": [*([] if replace else base.parts), part], "dataset_parts": dataset.parts,
                                  "encoded_rows": rows})
    save_record(store, emb)
    return emb


def test_an_append_is_merged_and_extends_the_index_old_tags_keep_old_rows(lake, vectors_store):
    embeddings, _, _ = _write_synthetic(lake)
    spec = _spec(ann_min_rows=1000, target_recall=0.9, recall_sample=40, k=10)
    first = build_index(lake, spec, embeddings, vectors_store)
    assert (first.write, first.index_action, first.trained_rows) == ("overwrite", "built", 5000)
    grown = _append(lake, embeddings, 200, "v2")
    second = build_index(lake, spec, grown, vectors_store, previous=first)
    assert (second.write, second.added_rows, second.rows) == ("merge_insert", 200, 5200)
    assert (second.index_action, second.index_type, second.trained_rows) == ("extended", first.index_type, 5000)
    assert second.recall_at_k >= 0.9 and second.index_params["tried"][-1]["build"] == "extended"
    assert second.table_version > first.table_version
    table = vectors_store.connect().open_table("synth")
    assert [(i.num_indexed_rows, i.num_unindexed_rows) for i in table.list_indices()] == [(5200, 0)]
    assert "by a delta segment (2 of" in second.index_reason  # the new rows in a segment of their own
    assert table.index_stats(table.list_indices()[0].name).num_indices == 2
    old = vectors_store.connect().open_table("synth")
    old.checkout(dataset_tag("v1"))
    assert old.count_rows() == 5000 and table.count_rows() == 5200
    assert old.search().where("id >= 15000").to_arrow().num_rows == 0
    new = vectors_store.connect().open_table("synth")
    new.checkout(second.tag)
    assert new.search().where("id >= 15000").limit(None).to_arrow().num_rows == 200
    # 30 % more rows than the index was trained on: the ladder again, on the whole table.
    third = build_index(lake, spec, _append(lake, grown, 2300, "v3", seed=6), vectors_store, previous=second)
    assert (third.write, third.index_action, third.trained_rows, third.rows) == ("merge_insert", "rebuilt", 7500, 7500)
    assert "newer than the index" in third.index_reason and third.recall_at_k >= 0.9


def test_appends_add_delta_segments_until_the_cap_merges_them(lake, vectors_store, monkeypatch):
    monkeypatch.setattr(lancedb_index, "MAX_INDEX_SEGMENTS", 3)
    embeddings, _, _ = _write_synthetic(lake)
    spec = _spec(ann_min_rows=1000, target_recall=0.9, recall_sample=40, k=10, rebuild_unindexed_fraction=0.5)
    record = build_index(lake, spec, embeddings, vectors_store)
    reasons = []
    for n, version in enumerate(["v2", "v3", "v4"]):
        embeddings = _append(lake, embeddings, 100, version, seed=10 + n)
        record = build_index(lake, spec, embeddings, vectors_store, previous=record)
        assert record.index_action == "extended" and record.recall_at_k >= 0.9
        table = vectors_store.connect().open_table("synth")
        reasons.append((record.index_reason.split(" by ")[1].split(" (")[0],
                        table.index_stats(table.list_indices()[0].name).num_indices))
    assert reasons == [("a delta segment", 2), ("3 segments merged into one", 1), ("a delta segment", 2)]
    assert [(i.num_indexed_rows, i.num_unindexed_rows) for i in table.list_indices()] == [(5300, 0)]
    assert table.search().where("id >= 15000").limit(None).to_arrow().num_rows == 300


def test_a_replace_version_overwrites_and_small_appends_stay_exact(lake, vectors_store):
    embeddings, _, _ = _write_synthetic(lake, rows=1500)
    spec = _spec(recall_sample=20)
    first = build_index(lake, spec, embeddings, vectors_store)
    grown = _append(lake, embeddings, 100, "v2")
    second = build_index(lake, spec, grown, vectors_store, previous=first)
    assert (second.write, second.index_action, second.recall_at_k, second.rows) == ("merge_insert", "exact", 1.0, 1600)
    third = build_index(lake, spec, _append(lake, grown, 300, "v3", replace=True), vectors_store, previous=second)
    assert (third.write, third.rows, third.added_rows) == ("overwrite", 300, 300)
    assert "not an append" in third.index_reason
    stale = build_index(lake, spec, _append(lake, grown, 50, "v4"), vectors_store, previous=second)
    assert stale.write == "overwrite" and "moved on" in stale.index_reason  # the table is at `third` now
