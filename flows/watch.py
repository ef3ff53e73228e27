"""The landing zone's two flows: the watcher that announces new files, and the handler of an announcement.

`watch-landing` (scheduled every minute, runnable on demand) lists `landing/<dataset>/`, keeps what is
past its watermark (tasks/landing.py), announces each such object as `lifecycle.dataset.landed` and
then saves the watermark in the object store. A crash between the two re-announces a few objects.

`landed` (triggered by that event, or by `lifecycle notify`) starts the object's ingest-validate run
with an idempotency key made of the object's URI and ETag. The key is kept in Prefect's database, so
however often an object is announced (watcher and bucket notification, redeliveries, a restarted
server), one ingest runs. This module imports only what listing needs: both flows run often and cheap.
"""

from __future__ import annotations

from datetime import timedelta

from prefect import flow, task
from prefect.events import emit_event
from prefect.logging import get_run_logger

from flows.params import ObjectUri, ProfileName
from infra_blocks import ObjectStore
from lifecycle.errors import LifecycleError
from tasks.landing import (
    LandedObject,
    Watermark,
    landed_event,
    landed_object,
    list_landing,
    load_watermark,
    plan_scan,
    save_watermark,
)
from tasks.orchestration import CHAIN_TAG, start_once, targets_for

INGEST_VALIDATE = "ingest-validate/ingest-validate"


@task(name="scan-landing", retries=2, retry_delay_seconds=5)
def scan_landing(store: ObjectStore, overlap_minutes: float) -> tuple[list[LandedObject], Watermark]:
    """Objects new since the watermark, and the watermark to save after announcing them."""
    return plan_scan(list_landing(store), load_watermark(store), timedelta(minutes=overlap_minutes))


@task(name="save-watermark", retries=2, retry_delay_seconds=5)
def save_watermark_task(store: ObjectStore, mark: Watermark) -> None:
    save_watermark(store, mark)


@flow(name="watch-landing", log_prints=True)
def watch_landing(profile: ProfileName | None = None, overlap_minutes: float = 10.0) -> list[str]:
    """Announce the landing files that are new since the last run; returns their URIs."""
    from prefect.events.worker import EventsWorker

    _, targets = targets_for(profile)
    store = targets.store
    new, mark = scan_landing(store, overlap_minutes)
    for obj in new:
        emit_event(**landed_event(obj))
    EventsWorker.drain_all()  # announced before the watermark moves past them
    save_watermark_task(store, mark)
    if new:
        get_run_logger().info("announced %d new object(s): %s", len(new), ", ".join(o.key for o in new))
    return [o.uri for o in new]


@flow(name="landed", log_prints=True)
def on_landed(uri: ObjectUri, etag: str = "", profile: ProfileName | None = None) -> str:
    """A file landed: start its ingest-validate run, once per (object, ETag) however often it is announced.

    Args:
        uri: the object's URI; it must be a file under the store's `landing/<dataset>/`.
        etag: the object's ETag (content hash); a rewritten object is a new one.
        profile: profile whose blocks are used; none: the server's default.

    Returns the id of the ingest-validate run (an earlier one when this object was already announced).
    """
    from tasks.specs import registered_spec

    name, targets = targets_for(profile)
    store = targets.store
    root = store.uri("")
    key = uri[len(root) + 1:] if uri.startswith(root + "/") else None
    obj = landed_object(store, key, etag or "unknown") if key else None
    if obj is None:
        raise LifecycleError(f"{uri}: not a file in the landing zone {store.uri('landing')}/<dataset>/")
    registered_spec(store, obj.dataset)  # an unknown dataset fails here, before any run is started
    run = start_once(INGEST_VALIDATE, {"dataset": obj.dataset, "uri": uri, "profile": name}, obj.dedupe_key,
                     tags=[CHAIN_TAG])
    get_run_logger().info("%s → ingest-validate run %s (%s)", uri, run.name, run.id)
    return str(run.id)
