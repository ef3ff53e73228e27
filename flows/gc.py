"""Retention as a Prefect flow: what `lifecycle gc` does, runnable from a deployment on a schedule.

It loads the profile's saved blocks (`<profile>-store`, `<profile>-vectors`) as the other entry points
do, runs `tasks.retention.gc_task` once and leaves the report as the flow's result and a markdown
artifact. Not a stage: it makes no record and takes part in no event chain.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger
from pydantic import Field

from flows.params import DatasetName, ProfileName
from tasks.orchestration import targets_for
from tasks.retention import RetentionPolicy, RetentionReport, gc_task


def report_markdown(report: RetentionReport) -> str:
    """The artifact: totals per area, then what was kept and why."""
    verb = "Would remove" if report.dry_run else "Removed"
    lines = [f"# Retention (keep {report.policy.keep}, min age {report.policy.min_age})", "",
             f"{verb} {len(report.removed)} items, {report.bytes_freed} bytes.", "",
             "| area | dataset | removed | bytes |", "|---|---|---:|---:|"]
    totals: dict[tuple[str, str], list[int]] = {}
    for item in report.removed:
        total = totals.setdefault((item.area, item.dataset), [0, 0])
        total[0] += 1
        total[1] += item.bytes
    lines += [f"| {a} | {d} | {n} | {b} |" for (a, d), (n, b) in sorted(totals.items())]
    lines += ["", "| kept | dataset | why |", "|---|---|---|"]
    lines += [f"| {i.what} | {i.dataset} | {i.why} |" for i in report.kept if not i.why.startswith("younger")]
    return "\n".join(lines)


@flow(name="gc")
def gc(keep: Annotated[int, Field(ge=1)] = 3, min_age_hours: Annotated[float, Field(ge=0)] = 1.0,
       datasets: list[DatasetName] | None = None, dry_run: bool = False,
       profile: ProfileName | None = None) -> RetentionReport:
    """Remove table files, embeddings, LanceDB versions and quarantined landings that nothing needs any more."""
    _, targets = targets_for(profile)
    policy = RetentionPolicy(keep=keep, min_age=timedelta(hours=min_age_hours), datasets=list(datasets or []))
    report = gc_task(targets.store, targets.vectors, policy, dry_run)
    get_run_logger().info("gc: %s %d items, %d bytes; kept %d", "would remove" if dry_run else "removed",
                          len(report.removed), report.bytes_freed, len(report.kept))
    create_markdown_artifact(report_markdown(report), key="gc", description="What retention removed and kept")
    return report
