"""The landing zone: raw files dropped under `landing/<dataset>/` in the object store, and the
`lifecycle.dataset.landed` event that announces each of them.

Two sources announce a landed object, and both may repeat themselves:
- the landing watcher (flows/watch.py) lists the prefix on a schedule and announces what is past its
  watermark. The watermark is saved after announcing, so a crash re-announces (at-least-once);
- `lifecycle notify FILE` turns an S3/MinIO event notification into the same event.
Repeats are expected and harmless: the event's id and the dedupe key are derived from the object's URI
and ETag, and the run an announcement starts is created with that key (tasks/orchestration.py), which
the Prefect database keeps. The same object announced any number of times starts one ingest.

Why a watermark of (time, recently seen ETags) rather than "last key": keys need not arrive in order,
and an object's LastModified is when its upload *started*, so a slow upload can appear behind a
faster, later one. Objects modified within `overlap` of the watermark are compared by ETag instead.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import unquote_plus

from pydantic import BaseModel, Field

from infra_blocks import ObjectStore
from lifecycle.errors import LifecycleError
from lifecycle.records import stable_hash

LANDING = "landing"
WATERMARK_KEY = "state/landing-watermark.json"
LANDED_EVENT = "lifecycle.dataset.landed"
DEFAULT_OVERLAP = timedelta(minutes=10)
_DATASET = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class LandedObject(BaseModel):
    """One raw file in the landing zone."""

    uri: str = Field(..., description="Full URI, e.g. s3://bucket/prefix/landing/tickets/2024-05-01.csv.")
    key: str = Field(..., description="Store key: landing/<dataset>/….")
    dataset: str
    etag: str = Field(..., description="S3 ETag (content hash) or size+mtime for file stores.")
    size: int = 0
    modified: datetime = _EPOCH

    @property
    def dedupe_key(self) -> str:
        """Idempotency key of the ingest run this object starts: one per (object, content)."""
        return f"landed-{self.dataset}-{stable_hash(self.uri, self.etag, length=24)}"

    @property
    def event_id(self) -> uuid.UUID:
        """The same object announced twice gets the same event id (the server drops repeats it remembers)."""
        return uuid.uuid5(uuid.NAMESPACE_URL, f"{self.uri}#{self.etag}")

    def event_resource(self) -> dict[str, str]:
        return {
            "prefect.resource.id": self.uri,
            "prefect.resource.name": self.key,
            "lifecycle.uri": self.uri,
            "lifecycle.etag": self.etag,
            "lifecycle.dataset": self.dataset,
            "lifecycle.size": str(self.size),
        }


class Watermark(BaseModel):
    """How far the watcher has looked: everything modified before `since - overlap` is announced, and
    objects modified after that are announced iff their (key, ETag) is not in `seen`."""

    since: datetime = _EPOCH
    seen: dict[str, str] = Field(default_factory=dict)


def dataset_of(key: str) -> str | None:
    """The dataset a landing key belongs to (`landing/<dataset>/…`), or None for keys to ignore:
    outside the landing zone, directly in it, hidden (`.x`) or temporary (`_x`) path parts."""
    parts = key.split("/")
    if len(parts) < 3 or parts[0] != LANDING or any(p.startswith((".", "_")) or not p for p in parts[1:]):
        return None
    return parts[1] if _DATASET.match(parts[1]) else None


def _as_datetime(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, tz=timezone.utc)
    if isinstance(value, str) and value:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return _EPOCH


def _etag(info: dict[str, Any]) -> str:
    tag = info.get("ETag") or info.get("etag")
    if tag:
        return str(tag).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or 0
    return f"{info.get('size', 0)}-{_as_datetime(mtime).timestamp():.6f}"


def landed_object(store: ObjectStore, key: str, etag: str, size: int = 0, modified: Any = None) -> LandedObject | None:
    """A LandedObject for a store key, or None when the key is not a landing file."""
    dataset = dataset_of(key)
    if dataset is None:
        return None
    return LandedObject(uri=store.uri(key), key=key, dataset=dataset, etag=etag.strip('"'), size=int(size or 0),
                        modified=_as_datetime(modified))


def list_landing(store: ObjectStore) -> list[LandedObject]:
    """Every landing file in the store, oldest first."""
    fs = store.filesystem()
    base = store.path(LANDING)
    try:
        found = fs.find(base, detail=True)
    except FileNotFoundError:
        return []
    root = store.path("") + "/"
    objects = []
    for path, info in found.items():
        if info.get("type") == "directory":
            continue
        key = path[len(root):] if path.startswith(root) else path
        obj = landed_object(store, key, _etag(info), info.get("size", 0),
                            info.get("LastModified") or info.get("mtime") or info.get("created"))
        if obj is not None:
            objects.append(obj)
    return sorted(objects, key=lambda o: (o.modified, o.key))


def plan_scan(objects: Iterable[LandedObject], mark: Watermark,
              overlap: timedelta = DEFAULT_OVERLAP) -> tuple[list[LandedObject], Watermark]:
    """Which objects are new since the watermark, and the watermark to save once they are announced."""
    objects = list(objects)
    horizon = mark.since - overlap
    new = [o for o in objects if o.modified >= horizon and mark.seen.get(o.key) != o.etag]
    since = max([mark.since, *(o.modified for o in objects)])
    keep_after = since - overlap
    seen = {o.key: o.etag for o in objects if o.modified >= keep_after}
    return new, Watermark(since=since, seen=seen)


def load_watermark(store: ObjectStore, key: str = WATERMARK_KEY) -> Watermark:
    if not store.exists(key):
        return Watermark()
    return Watermark.model_validate_json(store.read_bytes(key))


def save_watermark(store: ObjectStore, mark: Watermark, key: str = WATERMARK_KEY) -> None:
    store.write_bytes(key, mark.model_dump_json(indent=2).encode())


class Notified(BaseModel):
    """One object-created record of an S3 / MinIO event notification."""

    bucket: str
    key: str
    etag: str = ""
    size: int = 0
    event_time: datetime | None = None
    event_name: str = ""


def parse_notification(doc: Any, origin: str = "notification") -> list[Notified]:
    """The object-created records of an S3 or MinIO event notification (other events are left out).

    Accepts the S3 shape `{"Records": [...]}` (also what MinIO's webhook and queue targets send), a
    list of such documents, or a single record. Keys arrive URL-encoded and are decoded here.

    Raises:
        LifecycleError: the document has no S3 records (one line naming `origin`).
    """
    docs = doc if isinstance(doc, list) else [doc]
    records: list[dict[str, Any]] = []
    for item in docs:
        if isinstance(item, dict) and isinstance(item.get("Records"), list):
            records.extend(r for r in item["Records"] if isinstance(r, dict))
        elif isinstance(item, dict) and "s3" in item:
            records.append(item)
    if not records:
        raise LifecycleError(f"{origin}: not an S3 event notification (no Records with an s3 object)")
    out = []
    for rec in records:
        name = str(rec.get("eventName", ""))
        if "ObjectCreated" not in name:
            continue
        s3 = rec.get("s3") or {}
        bucket = (s3.get("bucket") or {}).get("name")
        obj = s3.get("object") or {}
        if not bucket or not obj.get("key"):
            raise LifecycleError(f"{origin}: record {name!r} lacks s3.bucket.name or s3.object.key")
        out.append(Notified(bucket=bucket, key=unquote_plus(str(obj["key"])), etag=str(obj.get("eTag", "")).strip('"'),
                            size=int(obj.get("size") or 0), event_name=name,
                            event_time=_as_datetime(rec.get("eventTime")) if rec.get("eventTime") else None))
    return out


def notified_objects(store: ObjectStore, notified: Iterable[Notified]) -> tuple[list[LandedObject], list[str]]:
    """Map notified objects to landing objects of this store; returns (landed, URIs that were skipped)."""
    landed, skipped = [], []
    root = store.path("") + "/"
    for n in notified:
        uri = f"s3://{n.bucket}/{n.key}"
        path = f"{n.bucket}/{n.key}"
        obj = None
        if store.protocol == "s3" and path.startswith(root):
            obj = landed_object(store, path[len(root):], n.etag or "unknown", n.size, n.event_time)
        if obj is None:
            skipped.append(uri)
        else:
            landed.append(obj)
    return landed, skipped


def read_notification(text: str, origin: str) -> list[Notified]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LifecycleError(f"{origin}: not JSON ({exc.msg} at line {exc.lineno})") from exc
    return parse_notification(doc, origin)


def landed_event(obj: LandedObject) -> dict[str, Any]:
    """Keyword arguments of `emit_event` for one landed object."""
    return {"event": LANDED_EVENT, "resource": obj.event_resource(), "id": obj.event_id,
            "payload": {"object": obj.model_dump(mode="json")}}


def object_etag(store: ObjectStore, source: str) -> str | None:
    """The ETag (or size+mtime in a file lake) of a source that is one landing object of the store;
    None for any other source. Ingest keys its idempotent commit on it, so a redelivered landing is
    recognised before it is read."""
    root = store.uri(LANDING) + "/"
    if not source.startswith(root) or any(ch in source for ch in "*?["):
        return None
    key = f"{LANDING}/{source[len(root):]}"
    if dataset_of(key) is None:
        return None
    try:
        with store.unreachable_as_error(key):
            info = store.filesystem().info(store.path(key))
    except FileNotFoundError:
        return None
    return None if info.get("type") == "directory" else _etag(info)
