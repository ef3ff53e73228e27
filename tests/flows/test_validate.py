"""The validate flow under the session's Prefect harness: cached verdicts, quarantine records, artifacts."""

from __future__ import annotations

import pytest

from flows.validate import validate
from lifecycle.errors import LifecycleError
from lifecycle.records import ValidationReport
from tasks.records import find_record, latest_record
from tasks.validation import report_id
from tests.tasks.test_validation import bad_tickets, ingest_frame


def read_artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return max(found, key=lambda a: a.created) if found else None


def test_second_call_returns_the_cached_report_without_rerunning(lake, sample_spec, dataset_version):
    first = validate(sample_spec, dataset_version, lake)
    assert first.success
    assert find_record(lake, ValidationReport, report_id(sample_spec, dataset_version)) == first
    artifact = read_artifact("validation-tickets")
    assert artifact is not None and "passed" in artifact.data and first.docs_key in artifact.data

    # Remove the Data Docs: a re-run would write them again, a cached call does not.
    lake.delete(f"validation/tickets/{dataset_version.id}/docs")
    second = validate(sample_spec, dataset_version, lake)
    assert second == first and second.created_at == first.created_at
    assert not lake.exists(first.docs_key)


def test_failing_flow_raises_with_the_names_and_leaves_a_quarantine_record(lake, sample_files):
    spec, dataset = ingest_frame(lake, sample_files, bad_tickets())
    with pytest.raises(LifecycleError) as failure:
        validate(spec, dataset, lake)

    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith(f"tickets@{dataset.id} failed validation: ")
    assert "expect_column_values_to_be_between(sentiment) 3 rows unexpected" in message
    for name in ("expect_column_values_to_not_be_null(ticket_id)", "expect_column_values_to_be_unique(ticket_id)",
                 "expect_column_values_to_be_in_set(category)"):
        assert name in message
    record = find_record(lake, ValidationReport, report_id(spec, dataset))
    assert record is not None and record.quarantined and len(record.failed) == 4
    assert latest_record(lake, ValidationReport, "tickets") == record
    assert "quarantined" in read_artifact("validation-tickets").data

    with pytest.raises(LifecycleError, match="failed validation"):  # the cached verdict still fails
        validate(spec, dataset, lake)
