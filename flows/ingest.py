"""Ingest flow: raw source → one audited commit of the dataset's Delta Lake table.

The stage writes, audits and commits (write–audit–publish, tasks/ingest.py). A landing that fails its
audit never reaches the table: its report is published here as the quarantine record (the same event
and artifact a failing validate stage publishes) and the flow fails listing the failed expectations,
so every later stage keeps the last good version.
"""

from __future__ import annotations

from prefect import flow

from flows.runner import Call, Stage, produce
from flows.validate import publish_verdict
from infra_blocks import ObjectStore
from lifecycle.errors import LifecycleError
from lifecycle.records import DatasetVersion
from lifecycle.spec import DatasetSpec
from tasks.ingest import LandingQuarantined, ingest_task


@flow(name="ingest", log_prints=True)
def ingest(spec: DatasetSpec, store: ObjectStore) -> DatasetVersion:
    """Ingest the spec's source as one commit; content already in the table commits nothing."""
    return produce(STAGE, Call(spec, store))


def _work(call: Call, record_id: str | None) -> DatasetVersion:
    # No record id to look for first: the version is the table's content after the commit, so the source
    # is always read (a repeat commits nothing) and the resulting version always announced.
    try:
        return ingest_task(call.store, call.spec)
    except LandingQuarantined as exc:
        publish_verdict(call.store, exc.report)
        raise LifecycleError(str(exc)) from None


STAGE = Stage(name="ingest", record=DatasetVersion, inputs=(), blocks=(), flow=ingest, work=_work)
