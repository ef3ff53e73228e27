"""The Prefect API as the lifecycle uses it from deployments: the server's default profile, one lifecycle
at a time per dataset, runs started at most once per key, and events sent from outside a flow run.

What is durable here, and why it was chosen (measured on Prefect 3.9, see STACK-NOTES):
- `run_deployment(..., idempotency_key=k)` is stored in the database, so "start this once" survives a
  server restart; the same event id twice is only dropped while the server remembers it (in memory).
- A global concurrency limit of 1 named after the dataset is a lock shared by every worker and
  machine; its slot is leased and renewed while held, so a crashed run frees it when the lease ends.
  Deployment concurrency limits, by contrast, cover the whole deployment, not one dataset.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lifecycle.errors import LifecycleError

PROFILE_VARIABLE = "lifecycle_profile"
DEFAULT_PROFILE = "local"
LOCK_PREFIX = "lifecycle-dataset-"
CHAIN_TAG = "lifecycle-chain"


def default_profile() -> str:
    """The profile this Prefect server's deployments use when a run names none.

    Kept as the Prefect variable `lifecycle_profile` (`lifecycle up --profile NAME` sets it), so the
    same prefect.yaml deploys unchanged to a laptop server (local) and a production one (prod).
    """
    from prefect.variables import Variable

    value = Variable.get(PROFILE_VARIABLE, default=DEFAULT_PROFILE)
    return str(value or DEFAULT_PROFILE)


def targets_for(profile: str | None):
    """The profile's name and its blocks from the API (`<profile>-<role>`); a profile without saved
    blocks fails here, at the start of a run, in one line."""
    from infra_blocks.profiles import load_targets

    name = profile or default_profile()
    return name, load_targets(name)


def set_default_profile(profile: str) -> None:
    from prefect.variables import Variable

    Variable.set(PROFILE_VARIABLE, profile, overwrite=True)


def lock_name(dataset: str) -> str:
    return f"{LOCK_PREFIX}{dataset}"


def ensure_lock(name: str) -> None:
    """Create the global concurrency limit `name` with one slot unless it exists (racing creators are fine:
    the server keeps names unique)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        except ObjectAlreadyExists:
            pass


@contextmanager
def dataset_lock(dataset: str, timeout_s: float | None = None) -> Iterator[None]:
    """Hold the dataset's lock: lifecycle work on one dataset never overlaps, whichever deployment,
    trigger or worker started it. A second run waits, then finds the first one's records (cached)."""
    from prefect.concurrency.sync import concurrency

    name = lock_name(dataset)
    ensure_lock(name)
    with concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True):
        yield


def start_once(deployment: str, parameters: dict[str, Any], key: str, tags: list[str] | None = None):
    """Create a run of `deployment` unless a run with idempotency key `key` exists; returns the run
    (the existing one on a repeat). Does not wait for it."""
    from prefect.deployments import run_deployment

    return run_deployment(deployment, parameters=parameters, idempotency_key=key, timeout=0, as_subflow=False,
                          tags=tags)


async def _send(events: list[dict[str, Any]]) -> None:
    from prefect.events import Event
    from prefect.events.clients import get_events_client

    async with get_events_client() as client:
        for kwargs in events:
            resource = kwargs["resource"]
            await client.emit(Event(event=kwargs["event"], resource=resource, id=kwargs["id"],
                                    payload=kwargs.get("payload", {}), related=kwargs.get("related", [])))


def send_events(events: list[dict[str, Any]]) -> None:
    """Send events from outside a flow run (the CLI) and return once they were handed to the server.

    Raises:
        LifecycleError: the Prefect API is not reachable (one line naming its URL).
    """
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise LifecycleError("PREFECT_API_URL is not set: start a server with `lifecycle up` or set it")
    try:
        asyncio.run(_send(events))
    except OSError as exc:
        raise LifecycleError(f"Prefect API {url}: cannot send events ({exc})") from exc
