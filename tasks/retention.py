"""Retention: remove old table files, embeddings, LanceDB versions and quarantined landings, never what is in use.

What is kept, and why:
- **Protected dataset versions**: the last `keep` lifecycle versions of each table, and every dataset
  version a registered model version (each `ModelVersion` record, through its `TrainedModel`) or a
  live deployment (each `Deployment` in status `serving`, through its model version and its index)
  was built from: a model's training data stays readable by time travel while its record exists. When
  such a chain breaks (a record is missing), nothing is removed from that dataset.
- **Delta tables**: a data file stays when the latest or any protected version references it (add
  actions); every other file in the table location goes once older than `min_age`. Write–audit–publish
  writes files into the table location *before* committing them, so `min_age` is what keeps a write in
  flight (or a commit in doubt awaiting its retry) safe: it must exceed the longest ingest.
  `_delta_log/` (any `_`/`.` path) is never touched: time travel needs it. No commit is written.
- **Why not delta-rs's `vacuum`**: delta-rs 1.6.6 can keep given versions' files
  (`vacuum(keep_versions=…, full=True)` selects the same files: the tests compare), but it ages by the
  *tombstone's* time, not the file's, and each vacuum writes two commits (`VACUUM START`/`END`). A
  commit the lifecycle did not write salts the table's content hash (the DatasetVersion id,
  tasks/lake.py): an unchanged table would become a new dataset version and every later stage re-run.
- **LanceDB**: one table per dataset, each build a version tagged `ds-<dataset version>`. Tags of
  dataset versions not protected (nor a live deployment's index) are deleted, then untagged versions
  older than `min_age` are pruned; the latest always stays. lancedb 0.40's own prune (`optimize(
  cleanup_older_than=…)`, which also compacts) refuses to run while a tagged version is older than its
  cutoff ("tagged version(s) have been marked for cleanup"), so alone it prunes only what is older than
  the oldest kept tag. With pylance (`lancedb[pylance]`), Lance's `cleanup_old_versions(
  error_if_tagged_old_versions=False)` prunes every untagged version; the plan says which applies.
- **Embeddings** (tasks/retention_embeddings.py): the sets of kept dataset versions, of live indexes and the
  latest set stay with every part they list (an append's inherited parts included); other parts under
  `embeddings/<dataset>/` go past `min_age`, and so do the records of the sets that lose one (else the embed
  stage would reuse them). A record that cannot be read or a broken `extends` chain: nothing goes.
- **Quarantine**: the newest `keep` landings of each dataset stay, older ones go past `min_age` (records stay).

`plan_retention` only reads; `apply_retention` carries a plan out (a file committed since stays).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from datetime import timedelta
from typing import Any

from prefect import task

from infra_blocks import ObjectStore, VectorStore
from lifecycle.errors import LifecycleError
from lifecycle.records import DatasetVersion, Deployment, IndexVersion, ModelVersion, R, TrainedModel, parse_record
from tasks.lake import table_key, table_state
from tasks.lancedb_index import dataset_tag
from tasks.records import find_record
from tasks.retention_embeddings import EmbeddingRecords, apply_embeddings, plan_embeddings
from tasks.retention_items import (
    Area,
    Item,
    Protection,
    RetentionPolicy,
    RetentionReport,
    epoch_seconds,
    list_objects,
    object_mtime,
)

FLOOR_MARGIN_S = 60.0  # lancedb-only prune: how far before the oldest tagged version its cutoff stays


def _records(store: ObjectStore, cls: type[R]) -> list[R]:
    return [parse_record(cls, store.read_bytes(k)) for k in store.list_keys(f"records/{cls.kind}")
            if k.endswith(".json")]


def protection(store: ObjectStore) -> Protection:
    """Follow every model version and live deployment back to the dataset versions it was built from."""
    out = Protection()

    def model_chain(model: ModelVersion, why: str) -> None:
        trained = find_record(store, TrainedModel, model.trained_model)
        if trained is None:
            out.unresolved[model.dataset] = f"{why}: its trained-model record {model.trained_model} is missing"
            return
        out.add("versions", trained.dataset, trained.dataset_version, why)

    for model in _records(store, ModelVersion):
        model_chain(model, f"model {model.model_name} v{model.version}")
    for deployment in _records(store, Deployment):
        if deployment.status != "serving":
            continue
        why = f"deployment {deployment.id} (serving)"
        model_id = deployment.inputs.get("model_version")
        served = find_record(store, ModelVersion, model_id) if model_id else None
        if served is None:
            out.unresolved[deployment.dataset] = f"{why}: its model-version record {model_id} is missing"
        else:
            model_chain(served, why)
        index = find_record(store, IndexVersion, deployment.index_version) if deployment.index_version else None
        if index is not None:
            out.add("tags", index.dataset, index.tag, why)
            out.add("sets", index.dataset, index.embedding_set, why)
            out.add("versions", index.dataset, index.dataset_version, why)
    return out


TablePlan = tuple[list[Item], list[Item], dict[str, list[str]]]  # remove, kept, kept dataset version ids


def plan_table(store: ObjectStore, name: str, policy: RetentionPolicy, protect: Protection, now: float) -> TablePlan:
    """The files of a Delta table that neither the latest nor any protected version references."""
    remove: list[Item] = []
    kept: list[Item] = []
    kept_ids: dict[str, list[str]] = {}
    latest = table_state(store, name)
    if latest is None:
        return remove, kept, kept_ids
    keep: dict[int, list[str]] = defaultdict(list)
    lifecycle_versions = (sorted({c.version for c in latest.commits} | {latest.version}) if latest.commits
                          else list(range(latest.version + 1)))  # a table another writer made: all its versions
    for v in lifecycle_versions[-policy.keep:]:
        keep[v].append("latest" if v == latest.version else f"one of the last {policy.keep} versions")
    by_hash = defaultdict(set)
    for c in latest.commits:
        by_hash[c.content_hash[:16]].add(c.version)
    for dataset_id, whys in protect.versions.get(name, {}).items():
        record = find_record(store, DatasetVersion, dataset_id)
        versions = by_hash.get(dataset_id, set()) | ({record.table_version} if record else set())
        if not versions:
            protect.unresolved[name] = f"dataset version {dataset_id} ({whys[0]}) is in no table version"
        for v in versions:
            keep[v].extend(whys)
    if name in protect.unresolved:
        return remove, [Item(area="table", dataset=name, what="every file", why=protect.unresolved[name])], kept_ids
    referenced: set[str] = set()
    for v in sorted(keep):
        state = latest if v == latest.version else table_state(store, name, v)
        assert state is not None
        referenced |= set(state.sizes)
        kept_ids.setdefault(state.content_hash[:16], []).extend(keep[v])
        kept.append(Item(area="table", dataset=name, what=f"version {v}", why="; ".join(dict.fromkeys(keep[v])),
                              bytes=sum(state.sizes.values())))
    added_by = {f: c.version for c in latest.commits for f in c.files}
    for rel, info in sorted(list_objects(store, table_key(name)).items()):
        if rel in referenced or any(part[:1] in "_." for part in rel.split("/")):
            continue
        key = f"{table_key(name)}/{rel}"
        size = int(info.get("size") or 0)
        mtime = object_mtime(info)
        if mtime is None or now - mtime < policy.min_age.total_seconds():
            kept.append(Item(area="table", dataset=name, what=key, bytes=size,
                             why=f"younger than {policy.min_age}: may be an ingest in flight"))
            continue
        why = (f"added by version {added_by[rel]}; no kept version references it" if rel in added_by
               else "in no commit (left by an ingest that did not finish)")
        remove.append(Item(area="table", dataset=name, what=key, bytes=size, why=why))
    return remove, kept, kept_ids


def _lance_table(vectors: VectorStore, name: str) -> Any | None:
    try:
        return vectors.connect().open_table(vectors.table_name(name))
    except (ValueError, FileNotFoundError):
        return None
    except (OSError, RuntimeError) as exc:
        raise LifecycleError(f"vector store {vectors.uri}: cannot open table {vectors.table_name(name)!r} "
                             f"({str(exc).splitlines()[0]})") from exc


def plan_index(vectors: VectorStore, name: str, policy: RetentionPolicy, protect: Protection,
               kept_ids: dict[str, list[str]], now: float) -> tuple[list[Item], list[Item]]:
    """The LanceDB tags to delete and the old versions `optimize` would prune, and the tags kept."""
    table = _lance_table(vectors, name)
    if table is None:
        return [], []
    label = vectors.table_name(name)
    if name in protect.unresolved:
        return [], [Item(area="index", dataset=name, what=label, why=protect.unresolved[name])]
    min_age = policy.min_age.total_seconds()
    stamps = {v["version"]: (epoch_seconds(v["timestamp"]) or 0.0) for v in table.list_versions()}
    wanted = {dataset_tag(d): whys for d, whys in kept_ids.items()}
    for tag, whys in protect.tags.get(name, {}).items():
        wanted.setdefault(tag, []).extend(whys)
    remove, kept, kept_versions = [], [], {table.version}
    for tag, info in sorted(table.tags.list().items(), key=lambda t: t[1]["version"]):
        version = info["version"]
        what = f"{label}: tag {tag} (version {version})"
        if tag in wanted or not tag.startswith(dataset_tag("")):
            kept.append(Item(area="index", dataset=name, what=what,
                             why="; ".join(dict.fromkeys(wanted.get(tag, ["not a dataset-version tag"])))))
            kept_versions.add(version)
        elif now - stamps.get(version, now) < min_age:
            kept.append(Item(area="index", dataset=name, what=what, why=f"younger than {policy.min_age}"))
            kept_versions.add(version)
        else:
            remove.append(Item(area="index", dataset=name, what=what, tag=tag, why="its dataset version is not kept"))
    old = [v for v, at in stamps.items() if v not in kept_versions and now - at >= min_age]
    if not _pylance():
        floor = min(stamps.get(v, now) for v in kept_versions) - FLOOR_MARGIN_S
        blocked = [v for v in old if stamps[v] >= floor]
        old = [v for v in old if stamps[v] < floor]
        if blocked:
            kept.append(Item(area="index", dataset=name, what=f"{label}: {len(blocked)} old versions",
                             why="newer than a kept tagged version: lancedb alone cannot prune past one "
                                 "(pylance can: lancedb[pylance])"))
    if old:
        remove.append(Item(area="index", dataset=name, what=f"{label}: {len(old)} old versions",
                           why=f"untagged (or tag removed), older than {policy.min_age}"))
    return remove, kept


def plan_quarantine(store: ObjectStore, name: str, policy: RetentionPolicy,
                    now: float) -> tuple[list[Item], list[Item]]:
    """Quarantined landings of a dataset beyond the newest `keep`, older than `min_age`."""
    prefix = f"quarantine/{name}"
    landings: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for rel, info in list_objects(store, prefix).items():
        landing, _, rest = rel.partition("/")
        landings[landing][rest] = info
    when: dict[str, float] = {}
    for landing, files in landings.items():  # the report's creation time, else the newest file's
        when[landing] = max((object_mtime(i) or now) for i in files.values())
        with suppress(LifecycleError, KeyError, ValueError, TypeError):
            when[landing] = epoch_seconds(json.loads(store.read_bytes(f"{prefix}/{landing}/report.json"))
                                          ["created_at"]) or when[landing]
    remove, kept = [], []
    for n, landing in enumerate(sorted(when, key=lambda k: when[k], reverse=True)):
        size = sum(int(i.get("size") or 0) for i in landings[landing].values())
        item = dict(area="quarantine", dataset=name, what=f"{prefix}/{landing}", bytes=size)
        if n < policy.keep:
            kept.append(Item(**item, why=f"one of the newest {policy.keep} quarantined landings"))
        elif now - when[landing] < policy.min_age.total_seconds():
            kept.append(Item(**item, why=f"younger than {policy.min_age}"))
        else:
            remove.append(Item(**item, why=f"beyond the newest {policy.keep}, older than {policy.min_age}"))
    return remove, kept


def datasets_in(store: ObjectStore, policy: RetentionPolicy) -> list[str]:
    """The datasets with a table or quarantined landings (or just those the policy names)."""
    if policy.datasets:
        return sorted(policy.datasets)
    return sorted({k.split("/", 2)[1] for p in ("datasets", "quarantine") for k in store.list_keys(p)
                   if k.count("/") >= 2})


def plan_retention(store: ObjectStore, vectors: VectorStore | None, policy: RetentionPolicy,
                   now: float | None = None) -> RetentionReport:
    """What a retention run would remove and keep (reads only). `report.removed` is the plan."""
    now = time.time() if now is None else now
    protect, embedding_sets = protection(store), EmbeddingRecords.load(store)
    report = RetentionReport(dry_run=True, policy=policy)
    for name in datasets_in(store, policy):
        remove, kept, kept_ids = plan_table(store, name, policy, protect, now)
        parts = [(remove, kept), plan_quarantine(store, name, policy, now),
                 plan_embeddings(store, name, policy, protect, kept_ids, embedding_sets, now)]
        if vectors is not None:
            parts.append(plan_index(vectors, name, policy, protect, kept_ids, now))
        for remove, kept in parts:
            report.removed.extend(remove)
            report.kept.extend(kept)
    return report


def _pylance() -> bool:
    return importlib.util.find_spec("lance") is not None


def _prune(vectors: VectorStore, table: Any, min_age: timedelta) -> tuple[int, int]:
    """Prune untagged versions older than `min_age`; returns (bytes removed, versions removed).

    Without pylance, lancedb's `optimize` (its async API, whose stats say what went; in a thread of its
    own so a caller inside an event loop is fine) with a cutoff just before the oldest tagged version.
    """
    if _pylance():
        stats = table.to_lance().cleanup_old_versions(older_than=min_age, error_if_tagged_old_versions=False)
        return stats.bytes_removed, stats.old_versions
    import lancedb

    stamps = {v["version"]: (epoch_seconds(v["timestamp"]) or 0.0) for v in table.list_versions()}
    tagged = [stamps[i["version"]] for i in table.tags.list().values() if i["version"] in stamps]
    floor = min([*tagged, stamps.get(table.version, time.time())]) - FLOOR_MARGIN_S
    age = max(min_age, timedelta(seconds=max(0.0, time.time() - floor)))

    async def run() -> tuple[int, int]:
        db = await lancedb.connect_async(vectors.uri, storage_options=vectors.lance_storage_options() or None)
        stats = await (await db.open_table(table.name)).optimize(cleanup_older_than=age)
        return stats.prune.bytes_removed, stats.prune.old_versions_removed

    with ThreadPoolExecutor(1, thread_name_prefix="lance-gc") as pool:
        return pool.submit(asyncio.run, run()).result()


def apply_retention(store: ObjectStore, vectors: VectorStore | None, plan: RetentionReport) -> RetentionReport:
    """Carry out a plan; returns the report of what went (index items with the bytes Lance freed)."""
    report = RetentionReport(dry_run=False, policy=plan.policy, kept=list(plan.kept))
    by_area: dict[tuple[Area, str], list[Item]] = defaultdict(list)
    for item in plan.removed:
        by_area[(item.area, item.dataset)].append(item)
    fs = store.filesystem()
    for (area, name), items in sorted(by_area.items()):
        if area == "table":
            latest = table_state(store, name)
            live = set(latest.keys()) if latest else set()
            for item in items:
                if item.what in live:  # committed since the plan was made
                    report.kept.append(item.model_copy(update={"why": "committed since the plan"}))
            doomed = [i for i in items if i.what not in live]
            with store.unreachable_as_error(table_key(name)):
                if doomed:
                    fs.rm([store.path(i.what) for i in doomed])
            report.removed.extend(doomed)
        elif area == "quarantine":
            for item in items:
                store.delete(item.what)
            report.removed.extend(items)
        elif area == "embeddings":
            removed, kept = apply_embeddings(store, name, items, plan.policy)
            report.removed.extend(removed)
            report.kept.extend(kept)
        elif vectors is not None:
            table = _lance_table(vectors, name)
            if table is None:
                continue
            tagged = [i for i in items if i.tag]
            for item in tagged:
                table.tags.delete(item.tag)
            report.removed.extend(tagged)
            if len(tagged) < len(items):  # the plan found old versions to prune
                freed, versions = _prune(vectors, table, plan.policy.min_age)
                report.removed.append(Item(area="index", dataset=name, bytes=freed,
                                           what=f"{vectors.table_name(name)}: {versions} old versions",
                                           why=f"untagged (or tag removed), older than {plan.policy.min_age}"))
    return report


def collect_garbage(store: ObjectStore, vectors: VectorStore | None, policy: RetentionPolicy,
                    dry_run: bool = False) -> RetentionReport:
    """Plan, then (unless `dry_run`) apply: the whole of `lifecycle gc`."""
    plan = plan_retention(store, vectors, policy)
    return plan if dry_run else apply_retention(store, vectors, plan)


@task(name="collect-garbage", retries=1, retry_delay_seconds=10, tags=["lifecycle", "gc"])
def gc_task(store: ObjectStore, vectors: VectorStore | None, policy: RetentionPolicy,
            dry_run: bool = False) -> RetentionReport:
    """Prefect wrapper: a retry re-plans from scratch (what went already is simply not found again)."""
    return collect_garbage(store, vectors, policy, dry_run)
