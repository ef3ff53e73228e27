"""Embed and index flows: records published, unchanged inputs cached, quarantined data refused."""

from __future__ import annotations

import pytest

from flows.embed import embed
from flows.index import index
from infra_blocks import VectorStore
from lifecycle.errors import QuarantinedError
from lifecycle.records import EmbeddingSet, FailedExpectation, IndexVersion, ValidationReport
from tasks.records import find_record, latest_record, save_record


def _report(dataset, success: bool = True) -> ValidationReport:
    failed = [] if success else [FailedExpectation(expectation="expect_column_values_to_not_be_null", column="text")]
    return ValidationReport(id=f"report-{success}", dataset=dataset.dataset, dataset_version=dataset.id,
                            success=success, evaluated=10, failed=failed)


def test_embed_then_index_publishes_records_and_caches(lake, sample_spec, dataset_version, local_compute, tmp_path):
    from prefect.artifacts import Artifact

    save_record(lake, dataset_version)
    report = _report(dataset_version)
    embeddings = embed(sample_spec, dataset_version, report, lake, local_compute)
    assert (embeddings.rows, embeddings.encoded_rows) == (600, 600)
    assert embeddings.inputs == {"dataset": dataset_version.id, "validation": report.id}
    assert find_record(lake, EmbeddingSet, embeddings.id) == embeddings
    assert latest_record(lake, EmbeddingSet, "tickets") == embeddings
    again = embed(sample_spec, dataset_version, report, lake, local_compute)
    assert again.created_at == embeddings.created_at  # cached: no new work, no new record

    vectors = VectorStore(uri=str(tmp_path / "lancedb"))
    built = index(sample_spec, embeddings, lake, vectors)
    assert (built.index_type, built.recall_at_k, built.table, built.rows) == ("exact", 1.0, "tickets", 600)
    assert find_record(lake, IndexVersion, built.id) == built
    table = vectors.connect().open_table("tickets")
    assert table.tags.list()[built.tag]["version"] == built.table_version
    assert index(sample_spec, embeddings, lake, vectors).created_at == built.created_at
    artifact = Artifact.get("index-tickets")
    assert artifact is not None and "recall@k" in artifact.data and "| 600 | exact" in artifact.data

    # A record whose table version is gone (another vector store, a deleted table) is rebuilt.
    elsewhere = VectorStore(uri=str(tmp_path / "other"))
    rebuilt = index(sample_spec, embeddings, lake, elsewhere)
    assert rebuilt.id != built.id and rebuilt.uri == elsewhere.uri


def test_embed_refuses_a_quarantined_version(lake, sample_spec, dataset_version, local_compute):
    with pytest.raises(QuarantinedError, match="quarantined"):
        embed(sample_spec, dataset_version, _report(dataset_version, success=False), lake, local_compute)
    assert latest_record(lake, EmbeddingSet, "tickets") is None


def test_an_appended_version_flows_through_embed_and_index_as_new_work(lake, sample_spec, dataset_version,
                                                                      local_compute, tmp_path):
    import numpy as np

    from lifecycle.sample import generate_tickets
    from tasks.ingest import ingest_dataset, read_dataset

    save_record(lake, dataset_version)
    vectors = VectorStore(uri=str(tmp_path / "lancedb"))
    first = embed(sample_spec, dataset_version, _report(dataset_version), lake, local_compute)
    built = index(sample_spec, first, lake, vectors)
    landing = tmp_path / "landing.csv"
    columns = read_dataset(lake, dataset_version).columns
    generate_tickets(40, seed=11).assign(ticket_id=np.arange(5001, 5041))[columns].to_csv(landing, index=False)
    grown = ingest_dataset(lake, sample_spec.model_copy(update={"source": str(landing)}))
    save_record(lake, grown)
    second = embed(sample_spec, grown, _report(grown), lake, local_compute)
    assert (second.rows, second.encoded_rows, second.extends) == (640, 40, first.id)
    extended = index(sample_spec, second, lake, vectors)
    assert (extended.write, extended.added_rows, extended.rows, extended.index_action) == ("merge_insert", 40, 640,
                                                                                         "exact")
    assert extended.recall_at_k == 1.0 and extended.table_version > built.table_version
    old = vectors.connect().open_table("tickets")
    old.checkout(built.tag)
    assert old.count_rows() == 600
