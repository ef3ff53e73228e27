"""`lifecycle gc`: remove old table files, embeddings, LanceDB versions and quarantined landings (tasks/retention.py).

Never removes what a registered model version or a live deployment was built from; nothing younger
than `--min-age` (an ingest in flight writes its files before it commits them, an embed its vector
parts before its record). Embedding sets are kept with the dataset versions they embed, plus the
latest set; the records of the sets whose parts go are deleted with them (area `embeddings`).
`--dry-run` prints the plan and removes nothing. Exit codes: 0 done (or nothing to do), 1 failed (one
line on stderr).
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Optional

import typer
from rich.table import Table

from cli.console import console, fail, prepare_env
from lifecycle.errors import LifecycleError

SHOWN = 20  # removed items listed one by one; the rest are summed up
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_age(text: str) -> timedelta:
    """`90s`, `30m`, `1h`, `7d` or `0` as a timedelta.

    Raises:
        LifecycleError: anything else (one line saying what is accepted).
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match or (not match.group(2) and float(match.group(1)) != 0):
        raise LifecycleError(f"--min-age {text!r}: give a number with a unit, e.g. 90s, 30m, 1h, 7d (or 0)")
    return timedelta(**{UNITS[match.group(2) or "s"]: float(match.group(1))})


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _print(report) -> None:
    verb = "would remove" if report.dry_run else "removed"
    gone = Table(title=f"lifecycle gc: {verb} {len(report.removed)} items, {_size(report.bytes_freed)}"
                       + (" (dry run)" if report.dry_run else ""))
    for col in ("area", "dataset", "what", "size", "why"):
        gone.add_column(col, overflow="fold")
    for item in report.removed[:SHOWN]:
        gone.add_row(item.area, item.dataset, item.what, _size(item.bytes) if item.bytes else "", item.why)
    if len(report.removed) > SHOWN:
        rest = report.removed[SHOWN:]
        gone.add_row("…", "", f"{len(rest)} more", _size(sum(i.bytes for i in rest)), "")
    if report.removed:
        console.print(gone)
    else:
        console.print(f"lifecycle gc: nothing to remove (keep {report.policy.keep}, min age {report.policy.min_age})")
    kept = Table(title="kept")
    for col in ("area", "dataset", "what", "why"):
        kept.add_column(col, overflow="fold")
    young: dict[str, list] = {}  # files kept for their age, one row per area
    for item in report.kept:
        if item.why.startswith("younger than") and item.area in ("table", "embeddings"):
            young.setdefault(item.area, []).append(item)
        else:
            kept.add_row(item.area, item.dataset, item.what, item.why)
    for area, items in young.items():
        kept.add_row(area, "", f"{len(items)} files", items[0].why)
    if report.kept:
        console.print(kept)


def gc(
    keep: int = typer.Option(3, "--keep", min=1, help="Table versions (and quarantined landings) kept per dataset."),
    min_age: str = typer.Option("1h", "--min-age", help="Nothing younger is removed: 90s, 30m, 1h, 7d."),
    dataset: Optional[list[str]] = typer.Option(None, "--dataset", help="Only this dataset (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; remove nothing."),
    profile: str = typer.Option("local", help="Profile in deployments/profiles or a YAML path."),
) -> None:
    """Remove table files, embeddings, index versions and quarantined landings nothing needs any more.

    Kept: the last KEEP versions of each table, every version a registered model version or a live
    deployment was built from (with their embedding sets, and the latest set), and anything younger
    than --min-age.
    """
    prepare_env()
    try:
        from infra_blocks.profiles import load_profile
        from tasks.retention import RetentionPolicy, collect_garbage

        policy = RetentionPolicy(keep=keep, min_age=parse_age(min_age), datasets=list(dataset or []))
        targets = load_profile(profile)
        report = collect_garbage(targets.store, targets.vectors, policy, dry_run=dry_run)
    except LifecycleError as exc:
        fail(exc)
    _print(report)
