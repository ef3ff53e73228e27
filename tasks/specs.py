"""Dataset specs kept in the object store, so that a run started from an event or a record id alone
can find the spec its inputs were made with.

Two kinds of spec documents live under `specs/<dataset>/`:
- `current.json`, the *registered* spec: what new data landing for the dataset is ingested with
  (`lifecycle register SPEC`, and `lifecycle up` for the bundled sample). For a landing its `source`
  becomes the landed object's URI, and with `ingest.mode: append` (the default) that object is one
  more commit of the dataset's Delta table: the table grows by each landing instead of being replaced.
- `<spec_hash>.json`, the exact spec a dataset version was ingested with (`DatasetVersion.spec_hash`),
  written before ingest. Later stages started by id load it, so they use the same expectations and
  train settings as the version's own ingest, even after the registered spec has changed.
"""

from __future__ import annotations

import json

from infra_blocks import ObjectStore
from lifecycle.errors import LifecycleError
from lifecycle.records import DatasetVersion
from lifecycle.spec import DatasetSpec, parse_spec

SPECS = "specs"


def registered_key(dataset: str) -> str:
    return f"{SPECS}/{dataset}/current.json"


def version_key(dataset: str, spec_hash: str) -> str:
    return f"{SPECS}/{dataset}/{spec_hash}.json"


def _dump(spec: DatasetSpec) -> bytes:
    return json.dumps(spec.model_dump(mode="json"), indent=2, sort_keys=True).encode()


def register_spec(store: ObjectStore, spec: DatasetSpec) -> str:
    """Make `spec` the one new data for its dataset is ingested with; returns the store key."""
    key = registered_key(spec.name)
    store.write_bytes(key, _dump(spec))
    return key


def registered_spec(store: ObjectStore, dataset: str, source: str | None = None) -> DatasetSpec:
    """The registered spec of a dataset, with `source` replaced when given.

    Raises:
        LifecycleError: no spec is registered for the dataset (one line naming where it was looked for).
    """
    key = registered_key(dataset)
    if not store.exists(key):
        raise LifecycleError(f"dataset {dataset!r}: no spec registered at {store.uri(key)}; "
                             "run `lifecycle register SPEC.yaml`")
    raw = json.loads(store.read_bytes(key))
    if source is not None:
        raw["source"] = source
    return parse_spec(raw, origin=store.uri(key))


def save_spec_version(store: ObjectStore, spec: DatasetSpec) -> str:
    """Keep the exact spec a dataset version is ingested with (idempotent: same spec, same key)."""
    key = version_key(spec.name, spec.section_hash())
    if not store.exists(key):
        store.write_bytes(key, _dump(spec))
    return key


def spec_for(store: ObjectStore, dataset: DatasetVersion) -> DatasetSpec:
    """The spec a dataset version was ingested with; the registered spec when that one was not kept
    (a version made by `lifecycle run` outside a deployment).

    Raises:
        LifecycleError: neither is in the store.
    """
    key = version_key(dataset.dataset, dataset.spec_hash)
    if store.exists(key):
        return parse_spec(json.loads(store.read_bytes(key)), origin=store.uri(key))
    return registered_spec(store, dataset.dataset, source=dataset.source)
