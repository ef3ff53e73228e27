"""Embed: text preparation, vectors on a real 2-process cluster, and reuse of unchanged rows."""

from __future__ import annotations

import hashlib
import os
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infra_blocks import ObjectStore
from lifecycle.encoder import EMBED_DIM, encode, encoded_counts, prepare_texts, relax_malloc_trim
from lifecycle.errors import LifecycleError
from lifecycle.sample import SAMPLE_SPEC, generate_tickets, write_sample
from lifecycle.spec import DatasetSpec, IngestConfig, load_spec
from tasks.embeddings import (
    EncodeOptions,
    embed_dataset,
    embedding_set_id,
    plan_units,
    read_embeddings,
    read_slice,
    run_units,
    text_hashes,
    unit_rows,
)
from tasks.ingest import ingest_dataset
from tasks.lake import read_dataset


def sample_spec(rows_per_task: int) -> DatasetSpec:
    return DatasetSpec(**{**SAMPLE_SPEC, "source": "x.csv", "embed": {"rows_per_task": rows_per_task}})


def test_prepare_texts_turns_non_strings_into_empty_and_cuts_long_ones():
    assert prepare_texts([None, float("nan"), 42, pd.NA, b"bytes", "", "abcdef"], 3) == ["", "", "", "", "", "", "abc"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_malloc_trim_is_relaxed_only_where_it_was_set_tiny(monkeypatch, local_compute):
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert relax_malloc_trim() is False  # a normal process keeps glibc's defaults
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    assert relax_malloc_trim() is True
    with local_compute.get_client() as client:  # Dask's nanny sets it in every worker: the case it is for
        assert set(client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()) == {"65536"}


def test_units_fill_every_worker_for_small_versions_but_never_get_tiny():
    spec = sample_spec(rows_per_task=2000)
    assert unit_rows(spec, 200_000, 2) == 2000  # a large version: rows_per_task
    assert unit_rows(spec, 2000, 2) == 1000  # a 2,000-row append: one unit per worker, not one in all
    assert unit_rows(spec, 300, 4) == 250  # never below MIN_UNIT_ROWS
    assert unit_rows(sample_spec(rows_per_task=100), 2000, 2) == 100  # a smaller rows_per_task stays


def test_text_hashes_are_stable_int64():
    h = text_hashes(["refund", "crash", "refund", ""])
    assert h.dtype == np.int64
    assert h[0] == h[2] and len(set(h.tolist())) == 3
    # Independent of the process (unlike hash()) and salted with the encoding version.
    assert text_hashes(["refund"])[0] == h[0] == int.from_bytes(
        hashlib.blake2b(b"refund", digest_size=8, key=b"all-MiniLM-L6-v2/1").digest(), "little", signed=True)


def test_encoder_vectors_for_empty_odd_and_long_texts():
    long = "refund " * 20_000
    texts = prepare_texts([None, "", 17, "refund for my invoice", long], max_chars=2000)
    vectors = encode(texts)
    assert vectors.shape == (5, EMBED_DIM) and vectors.dtype == np.float32 and vectors.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # null, "" and a non-string all get the embedding of the empty input, which is not a real text's.
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)
    assert float(vectors[0] @ vectors[3]) < 0.9
    np.testing.assert_allclose(vectors[4], encode([long[:2000]])[0], atol=1e-4)
    assert encode([]).shape == (0, EMBED_DIM)


def test_read_slice_reads_the_row_range_across_row_groups(lake):
    table = pa.table({"id": np.arange(1000), "text": [f"t{i}" for i in range(1000)]})
    lake.write_bytes("x/part.parquet", b"")
    pq.write_table(table, lake.path("x/part.parquet"), row_group_size=100)
    got = read_slice(lake, "x/part.parquet", ["id"], 150, 420)
    assert got.column("id").to_pylist() == list(range(150, 420))
    assert read_slice(lake, "x/part.parquet", ["id"], 990, 1000).num_rows == 10


REPLACE = IngestConfig(mode="replace")


@pytest.fixture(scope="module")
def first(tmp_path_factory, local_compute):
    """The 600-row sample embedded once on the cluster, in units of 250 rows."""
    root = tmp_path_factory.mktemp("embed")
    _, spec_path = write_sample(root / "raw", rows=600)
    spec = load_spec(spec_path)
    spec = spec.model_copy(update={"embed": spec.embed.model_copy(update={"rows_per_task": 250})})
    store = ObjectStore(url=f"file://{root / 'lake'}")
    dataset = ingest_dataset(store, spec)
    return store, spec, dataset, embed_dataset(store, spec, dataset, local_compute)


def _vectors_by_id(store, record) -> dict:
    table = read_embeddings(store, record)
    vectors = table.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, EMBED_DIM)
    return dict(zip(table.column("id").to_pylist(), vectors))


def test_embed_sample_writes_parts_in_row_order(first):
    store, spec, dataset, record = first
    assert record.id == embedding_set_id(spec, dataset)
    assert (record.rows, record.encoded_rows, record.dim, record.dataset_version) == (600, 600, 384, dataset.id)
    assert record.parts == [f"embeddings/tickets/{record.id}/part-{i:05d}.parquet" for i in range(3)]
    table = read_embeddings(store, record)
    assert table.schema.field("id").type == pa.int64()
    assert table.schema.field("vector").type.list_size == EMBED_DIM
    assert table.schema.field("vector").type.value_type == pa.float32()
    frame = read_dataset(store, dataset, ["ticket_id", "text"])
    assert table.column("id").to_pylist() == frame["ticket_id"].tolist()
    got = _vectors_by_id(store, record)
    rows = [0, 249, 250, 599]
    expected = encode(frame["text"].iloc[rows].tolist())
    for i, row in enumerate(rows):
        np.testing.assert_allclose(got[int(frame["ticket_id"].iloc[row])], expected[i], atol=1e-4)


def _worker_texts_encoded(compute) -> int:
    """Texts the workers' encoders have really been given so far (counted in each worker process)."""
    with compute.get_client() as client:
        return sum(c["texts"] for c in client.run(encoded_counts).values())


def test_second_version_encodes_only_new_rows(first, local_compute, tmp_path):
    store, spec, dataset, record = first
    frame = read_dataset(store, dataset)
    extra = generate_tickets(50, seed=99).assign(ticket_id=np.arange(601, 651))
    path = tmp_path / "more.csv"
    pd.concat([frame, extra[frame.columns]], ignore_index=True).to_csv(path, index=False)
    spec2 = spec.model_copy(update={"source": str(path), "ingest": REPLACE})  # a new snapshot of the table
    dataset2 = ingest_dataset(store, spec2)
    assert dataset2.id != dataset.id and dataset2.rows == 650
    before = _worker_texts_encoded(local_compute)
    second = embed_dataset(store, spec2, dataset2, local_compute, previous=record)
    assert _worker_texts_encoded(local_compute) - before == 50  # the encoder saw only the new rows
    assert (second.rows, second.encoded_rows) == (650, 50)
    assert second.inputs["reused_embeddings"] == record.id
    old, new = _vectors_by_id(store, record), _vectors_by_id(store, second)
    assert all(np.array_equal(old[i], new[i]) for i in old)  # copied bit for bit
    np.testing.assert_allclose(new[650], encode([extra["text"].iloc[-1]])[0], atol=1e-4)


def test_changed_null_empty_and_long_texts_are_re_encoded(first, local_compute, tmp_path):
    store, spec, dataset, record = first
    frame = read_dataset(store, dataset)
    long = "my package delivery is delayed " * 400
    frame.loc[10, "text"] = "refund for my invoice please"
    frame.loc[20, "text"] = None
    frame.loc[21, "text"] = ""
    frame.loc[300, "text"] = long
    path = tmp_path / "edited.parquet"
    frame.to_parquet(path)
    spec3 = spec.model_copy(update={"source": str(path), "ingest": REPLACE})  # a new snapshot of the table
    dataset3 = ingest_dataset(store, spec3)
    units = plan_units(store, spec3, dataset3, "edited", previous=record)
    assert [(u.start, u.stop, len(u.reuse_pos)) for u in units] == [(0, 250, 250), (250, 500, 250), (500, 600, 100)]
    opts = EncodeOptions("ticket_id", "text", spec.embed.max_chars, spec.embed.batch_size, "cpu",
                         tuple(record.parts))
    results = run_units(local_compute, units, store, opts)
    assert [r.encoded for r in results] == [3, 1, 0]  # rows 10, 20, 21 | row 300; the rest copied
    table = pa.concat_tables(pq.read_table(store.path(r.key)) for r in results)
    vectors = table.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, EMBED_DIM)
    empty, refund, cut = encode(["", "refund for my invoice please", long[: spec.embed.max_chars]])
    np.testing.assert_allclose(vectors[20], empty, atol=1e-4)
    np.testing.assert_allclose(vectors[21], empty, atol=1e-4)
    np.testing.assert_allclose(vectors[10], refund, atol=1e-4)
    np.testing.assert_allclose(vectors[300], cut, atol=1e-4)


def test_numbers_in_the_text_column_are_embedded_as_their_text(first, local_compute, tmp_path):
    """A numeric column named as the text column is ingested as strings ("7"), and embedded as that text."""
    store, spec, dataset, _ = first
    frame = read_dataset(store, dataset).head(40)
    frame["text"] = np.arange(40, dtype=np.int64) * 7
    frame.loc[3, "text"] = pd.NA
    path = tmp_path / "numbers.parquet"
    frame.astype({"text": "Int64"}).to_parquet(path)
    few = spec.expectations.model_copy(update={"min_rows": 1})  # ingest audits: 40 rows must be allowed
    spec4 = spec.model_copy(update={"source": str(path), "ingest": REPLACE, "expectations": few})
    dataset4 = ingest_dataset(store, spec4)
    record = embed_dataset(store, spec4, dataset4, local_compute)
    assert (record.rows, record.encoded_rows) == (40, 40)
    vectors = read_embeddings(store, record).column("vector").combine_chunks().flatten().to_numpy().reshape(-1, 384)
    np.testing.assert_allclose(vectors[[1, 5]], encode(["7", "35"]), atol=1e-4)
    np.testing.assert_allclose(vectors[3], encode([""])[0], atol=1e-4)  # a null is the empty text


def test_embed_needs_a_text_column(first, local_compute):
    store, spec, dataset, _ = first
    with pytest.raises(LifecycleError, match="text_column"):
        embed_dataset(store, spec.model_copy(update={"text_column": None}), dataset, local_compute)


def test_an_append_encodes_only_its_rows_and_references_the_earlier_parts(first, local_compute, tmp_path):
    store, spec, dataset, record = first
    grown_table = ObjectStore(url=f"file://{tmp_path / 'lake'}")  # a table of its own: v0 = the sample, v1 = +50
    base = ingest_dataset(grown_table, spec)
    base_set = embed_dataset(grown_table, spec, base, local_compute)
    extra = generate_tickets(50, seed=7).assign(ticket_id=np.arange(1001, 1051))
    path = tmp_path / "landing.csv"
    extra[read_dataset(store, dataset).columns].to_csv(path, index=False)
    appended = ingest_dataset(grown_table, spec.model_copy(update={"source": str(path)}))  # ingest.mode: append
    assert appended.parts[:len(base.parts)] == base.parts and appended.rows == 650
    before = _worker_texts_encoded(local_compute)
    second = embed_dataset(grown_table, spec, appended, local_compute, previous=base_set)
    assert _worker_texts_encoded(local_compute) - before == 50  # the encoder saw the appended rows only
    assert (second.rows, second.encoded_rows, second.extends) == (650, 50, base_set.id)
    assert second.parts[:3] == base_set.parts  # referenced, not copied
    assert second.parts[3:] == [f"embeddings/tickets/{second.id}/part-00000.parquet"]
    assert sorted(grown_table.list_keys(f"embeddings/tickets/{second.id}")) == second.parts[3:]
    table = read_embeddings(grown_table, second)
    assert table.column("id").to_pylist() == read_dataset(grown_table, appended)["ticket_id"].tolist()
    np.testing.assert_allclose(_vectors_by_id(grown_table, second)[1050], encode([extra["text"].iloc[-1]])[0],
                               atol=1e-4)
    # Made with another cut of the texts, the earlier set's vectors do not fit: every row is embedded.
    shorter = spec.model_copy(update={"embed": spec.embed.model_copy(update={"max_chars": 500})})
    third = embed_dataset(grown_table, shorter, appended, local_compute, previous=base_set)
    assert third.extends is None and all(k.startswith(f"embeddings/tickets/{third.id}/") for k in third.parts)
