"""What retention plans and reports are made of, and how it lists the store (tasks/retention.py).

Why this shape: the plan of each area (tables and LanceDB in tasks/retention.py, embedding sets in
tasks/retention_embeddings.py) builds the same `Item`s from the same policy and the same one-listing
view of the store. They live here so that both plan modules import them and neither imports the
other's plan (no import cycle inside the tasks layer); tasks/retention.py re-exports them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from pydantic import BaseModel, Field

from infra_blocks import ObjectStore

Area = Literal["table", "index", "quarantine", "embeddings"]


class RetentionPolicy(BaseModel):
    """What `lifecycle gc` keeps beyond what models and deployments were built from."""

    keep: int = Field(3, ge=1, description="Lifecycle versions kept per table (and quarantined landings per dataset).")
    min_age: timedelta = Field(timedelta(hours=1), description="Nothing younger is removed (writes in flight).")
    datasets: list[str] = Field(default_factory=list, description="Only these datasets (all when empty).")


class Item(BaseModel):
    """One thing removed (or to be removed) or kept, and why."""

    area: Area
    dataset: str
    what: str = Field(..., description="A store key, a table version, an index tag, a quarantined landing "
                                       "or an embedding set.")
    why: str
    bytes: int = 0
    tag: str | None = Field(None, description="The LanceDB tag an index item deletes.")


class RetentionReport(BaseModel):
    """What a retention run removed (or, with `dry_run`, would remove) and what it kept."""

    dry_run: bool
    policy: RetentionPolicy
    removed: list[Item] = Field(default_factory=list)
    kept: list[Item] = Field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return sum(i.bytes for i in self.removed)


@dataclass
class Protection:
    """Dataset versions, index tags and embedding sets that models and deployments were built from, per dataset."""

    versions: dict[str, dict[str, list[str]]] = field(default_factory=lambda: defaultdict(dict))
    tags: dict[str, dict[str, list[str]]] = field(default_factory=lambda: defaultdict(dict))
    sets: dict[str, dict[str, list[str]]] = field(default_factory=lambda: defaultdict(dict))
    unresolved: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, dataset: str, key: str, why: str) -> None:
        getattr(self, kind)[dataset].setdefault(key, []).append(why)


def object_mtime(info: dict[str, Any]) -> float | None:
    """An object's modification time from an fsspec listing (local `mtime`, s3fs `LastModified`)."""
    return epoch_seconds(info.get("mtime", info.get("LastModified", info.get("last_modified"))))


def epoch_seconds(value: Any) -> float | None:
    """Seconds since the epoch of a datetime (naive: UTC), an ISO string or a number; None otherwise."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    return float(value) if isinstance(value, (int, float)) else None


def list_objects(store: ObjectStore, prefix: str) -> dict[str, dict[str, Any]]:
    """Objects under a prefix: key (relative to the prefix) -> fsspec info, one listing."""
    base = store.path(prefix)
    with store.unreachable_as_error(prefix):
        try:
            found = store.filesystem().find(base, detail=True)
        except FileNotFoundError:
            return {}
    return {p[len(base) + 1:]: info for p, info in found.items()
            if p.startswith(base + "/") and info.get("type", "file") != "directory"}
