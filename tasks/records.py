"""Reading, writing and announcing stage records in the object store."""

from __future__ import annotations

from prefect import task
from prefect.events import emit_event

from infra_blocks import ObjectStore
from lifecycle.errors import LifecycleError
from lifecycle.records import R, Record, dump_record, latest_key, parse_record, record_key


def save_record(store: ObjectStore, record: Record) -> str:
    """Persist a record and point `records/latest/<dataset>/<kind>.json` at it; returns its key."""
    data = dump_record(record)
    store.write_bytes(record.key, data)
    store.write_bytes(latest_key(type(record), record.dataset), data)
    return record.key


def find_record(store: ObjectStore, cls: type[R], record_id: str) -> R | None:
    """The stored record with this id, or None: how a stage learns its work is already done."""
    key = record_key(cls, record_id)
    if not store.exists(key):
        return None
    return parse_record(cls, store.read_bytes(key))


def load_record(store: ObjectStore, cls: type[R], record_id: str) -> R:
    record = find_record(store, cls, record_id)
    if record is None:
        raise LifecycleError(f"{store.uri(record_key(cls, record_id))}: no such {cls.kind} record")
    return record


def latest_record(store: ObjectStore, cls: type[R], dataset: str) -> R | None:
    key = latest_key(cls, dataset)
    return parse_record(cls, store.read_bytes(key)) if store.exists(key) else None


def announce(record: Record, event: str | None = None) -> None:
    """Emit the record's Prefect event so that triggers can chain the next stages."""
    name = event or record.event
    if name:
        emit_event(event=name, resource=record.event_payload(), payload={"record": record.model_dump(mode="json")})


@task(name="publish-record", retries=2, retry_delay_seconds=2)
def publish_record(store: ObjectStore, record: Record, event: str | None = None) -> Record:
    """Save a record (the stage's commit point) and announce it."""
    save_record(store, record)
    announce(record, event)
    return record
