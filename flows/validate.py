"""Validate flow: the quality gate. A passing report lets later stages use the version; a failing one
is published as its quarantine record and fails the flow with the failed expectations named."""

from __future__ import annotations

import re

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from infra_blocks import ObjectStore
from lifecycle.errors import LifecycleError
from lifecycle.records import DatasetVersion, ValidationReport
from lifecycle.spec import DatasetSpec
from tasks.records import find_record, publish_record
from tasks.validation import failure_line, report_id, report_markdown, validate_task, version_label

QUARANTINED_EVENT = "lifecycle.dataset.quarantined"


def _raise_if_failed(report: ValidationReport, dataset: DatasetVersion) -> ValidationReport:
    if not report.success:
        raise LifecycleError(f"{version_label(dataset)} failed validation: {failure_line(report)}")
    return report


@flow(name="validate", log_prints=True)
def validate(spec: DatasetSpec, dataset: DatasetVersion, store: ObjectStore) -> ValidationReport:
    """Validate a dataset version once per (data, suite, code); a cached verdict is returned as is.

    Raises:
        LifecycleError: the version failed validation (also when that verdict was cached).
    """
    cached = find_record(store, ValidationReport, report_id(spec, dataset))
    if cached is not None:
        return _raise_if_failed(cached, dataset)
    report = validate_task(store, spec, dataset)
    publish_record(store, report, event=None if report.success else QUARANTINED_EVENT)
    create_markdown_artifact(
        markdown=report_markdown(report, store),
        key=f"validation-{re.sub(r'[^a-z0-9-]', '-', dataset.dataset.lower())}",
        description=f"Validation of {version_label(dataset)}",
    )
    return _raise_if_failed(report, dataset)
