"""Validate flow: the quality gate. A passing report lets later stages use the version; a failing one
is published as its quarantine record and fails the flow with the failed expectations named.

Under write–audit–publish the checks already ran before the commit (tasks/ingest.py): this stage
publishes the report that audit left for the version (`lifecycle.dataset.validated` starts the
build), and validates afresh only a version without one (e.g. after the spec's expectations changed).
"""

from __future__ import annotations

import re

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.runner import Call, Input, Stage, produce
from infra_blocks import ObjectStore
from lifecycle.errors import LifecycleError
from lifecycle.records import DatasetVersion, ValidationReport
from lifecycle.spec import DatasetSpec
from tasks.audit import validate_task
from tasks.records import publish_record
from tasks.validation import failure_line, report_id, report_markdown, version_label

QUARANTINED_EVENT = "lifecycle.dataset.quarantined"


@flow(name="validate", log_prints=True)
def validate(spec: DatasetSpec, dataset: DatasetVersion, store: ObjectStore) -> ValidationReport:
    """Validate a dataset version once per (data, suite, code); a cached verdict is returned as is.

    Raises:
        LifecycleError: the version failed validation (also when that verdict was cached).
    """
    return produce(STAGE, Call(spec, store, {"dataset": dataset}))


def _work(call: Call, record_id: str | None) -> ValidationReport:
    return validate_task(call.store, call.spec, call.get(DatasetVersion))


def _publish(call: Call, report: ValidationReport) -> None:
    publish_verdict(call.store, report)


def publish_verdict(store: ObjectStore, report: ValidationReport) -> None:
    """A failing report is published as the quarantine event; either way the verdict becomes an artifact.

    Also what ingest publishes for a landing its audit refused (flows/ingest.py).
    """
    publish_record(store, report, event=None if report.success else QUARANTINED_EVENT)
    create_markdown_artifact(
        markdown=report_markdown(report, store),
        key=f"validation-{re.sub(r'[^a-z0-9-]', '-', report.dataset.lower())}",
        description=f"Validation of {report.dataset}@{report.dataset_version}",
    )


def _raise_if_failed(call: Call, report: ValidationReport) -> ValidationReport:
    if not report.success:
        raise LifecycleError(f"{version_label(call.get(DatasetVersion))} failed validation: {failure_line(report)}")
    return report


STAGE = Stage(
    name="validate", record=ValidationReport, inputs=(Input("dataset", "dataset"),), blocks=(), flow=validate,
    work=_work, record_id=lambda call: report_id(call.spec, call.get(DatasetVersion)), publish=_publish,
    accept=_raise_if_failed,
)
