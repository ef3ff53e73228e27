"""The validate flow under the session's Prefect harness: cached verdicts, quarantine records, artifacts."""

from __future__ import annotations

import pytest

from flows.validate import validate
from lifecycle.errors import LifecycleError
from lifecycle.records import ValidationReport
from tasks.records import find_record, latest_record
from tasks.validation import report_id
from tests.tasks.test_validation import bad_tickets


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


def test_a_bad_landing_fails_ingest_with_the_names_and_leaves_a_quarantine_record(lake, sample_files):
    """Write–audit–publish: the audit inside ingest refuses the landing, the flow fails naming the failed
    expectations, the report is published as the quarantine record, and the table never changes."""
    from flows.ingest import ingest
    from lifecycle.records import DatasetVersion
    from lifecycle.spec import load_spec
    from tasks.lake import table_state

    bad_tickets().to_csv(sample_files[0], index=False)
    spec = load_spec(sample_files[1])
    with pytest.raises(LifecycleError) as failure:
        ingest(spec, lake)

    message = str(failure.value)
    assert "\n" not in message and " failed validation: " in message and "nothing committed" in message
    assert "expect_column_values_to_be_between(sentiment) 3 rows unexpected" in message
    for name in ("expect_column_values_to_not_be_null(ticket_id)", "expect_column_values_to_be_unique(ticket_id)",
                 "expect_column_values_to_be_in_set(category)"):
        assert name in message
    record = latest_record(lake, ValidationReport, "tickets")
    assert record is not None and record.quarantined and len(record.failed) == 4
    assert message.startswith(f"tickets@{record.dataset_version} failed validation: ")
    assert record.docs_key == f"quarantine/tickets/{record.dataset_version}/docs/index.html"
    assert lake.exists(record.docs_key) and "quarantined" in read_artifact("validation-tickets").data
    assert table_state(lake, "tickets") is None and latest_record(lake, DatasetVersion, "tickets") is None


def test_validate_publishes_the_report_of_the_audit_without_running_the_suite_again(lake, sample_spec,
                                                                                     dataset_version, monkeypatch):
    import tasks.audit

    def not_again(*args, **kwargs):
        raise AssertionError("the audit's report should have been used")

    monkeypatch.setattr(tasks.audit, "run_validation", not_again)
    report = validate(sample_spec, dataset_version, lake)
    assert report.success and report.dataset_version == dataset_version.id
    assert report.docs_key == f"validation/tickets/{dataset_version.id}/docs/index.html"
    assert lake.exists(report.docs_key)
    assert latest_record(lake, ValidationReport, "tickets") == report


def test_a_quarantined_version_fails_the_flow_also_when_cached(lake, sample_spec):
    from tests.tasks.test_validation import write_version

    dataset = write_version(lake, bad_tickets())
    with pytest.raises(LifecycleError) as failure:
        validate(sample_spec, dataset, lake)
    message = str(failure.value)
    assert "\n" not in message and message.startswith(f"tickets@{dataset.id} failed validation: ")
    assert "expect_column_values_to_be_between(sentiment) 3 rows unexpected" in message
    record = find_record(lake, ValidationReport, report_id(sample_spec, dataset))
    assert record is not None and record.quarantined and len(record.failed) == 4
    assert "quarantined" in read_artifact("validation-tickets").data
    with pytest.raises(LifecycleError, match="failed validation"):  # the cached verdict still fails
        validate(sample_spec, dataset, lake)
