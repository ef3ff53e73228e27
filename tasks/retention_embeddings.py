"""Retention of embedding sets: vector parts no kept set lists, and the records of the sets they break.

Why this shape:
- **What stays**: every set of a dataset version the table plan keeps (`kept_ids`: the last `keep`
  lifecycle versions and every version a registered model version or live deployment was built from),
  the set a live deployment's index was built from, and the dataset's latest set (`records/latest/
  <dataset>/embeddings.json`: the one a later append extends and a replace copies unchanged vectors
  from). A file under `embeddings/<dataset>/` stays when a kept set lists it in `parts`. An append's set
  lists the parts of the set it extends as its own first parts, so following `parts` alone keeps
  everything a kept set reads, inherited parts included; nothing walks `extends` to decide what stays.
- **min_age**: every other file goes once its set folder's newest file is older than `min_age`. An embed
  in flight writes its parts one by one and its record last: while it runs no record lists them, but its
  folder's newest part is about one unit old, so `min_age` must exceed a unit's time, not the whole embed.
- **Records go too**: the embed stage finds finished work by the set's content id (flows/runner.py
  `produce` → `find_record`) and would hand a set whose files are gone to the index stage. So the
  record of every set that loses a part (or already lacks one) is deleted, and a rerun of its dataset
  version embeds again (unchanged rows copied from the latest set). Records go before parts: an
  interrupted run leaves orphan files (removed next time), never a record without its files. A set
  whose parts all stay (one a kept append starts with) keeps its record, so no kept set's `extends`
  names a missing record (an append's parts start with the parts of the set it extends).
- **Unclear means untouched**: a record of the dataset that cannot be read (a record whose dataset
  cannot be told blocks every dataset), an unreadable latest pointer, a set whose `extends` names a
  missing set or one whose parts are not its first parts, no table, or an unresolved model chain:
  nothing of that dataset's embeddings is removed, as the table plan does for a broken chain.
"""

from __future__ import annotations

import json
import posixpath
import time
from collections import defaultdict
from contextlib import suppress
from dataclasses import dataclass, field

from infra_blocks import ObjectStore
from lifecycle.errors import LifecycleError
from lifecycle.records import EmbeddingSet, latest_key, parse_record, record_key
from tasks.retention_items import Item, Protection, RetentionPolicy, list_objects, object_mtime

RECORDS = f"records/{EmbeddingSet.kind}"
Plan = tuple[list[Item], list[Item]]  # remove, kept


def embeddings_prefix(dataset: str) -> str:
    return f"embeddings/{dataset}"


def _dataset_of(data: bytes) -> str:
    """The `dataset` field of a record that does not parse, or "" when not even that can be read."""
    with suppress(ValueError, TypeError, AttributeError):
        name = json.loads(data).get("dataset")
        return name if isinstance(name, str) else ""
    return ""


@dataclass
class EmbeddingRecords:
    """Every EmbeddingSet record of the store by dataset, read once per plan, and those that did not parse."""

    sets: dict[str, dict[str, EmbeddingSet]] = field(default_factory=lambda: defaultdict(dict))
    unreadable: dict[str, str] = field(default_factory=dict)  # dataset ("": cannot be told) -> why

    @classmethod
    def load(cls, store: ObjectStore) -> EmbeddingRecords:
        out = cls()
        for key in store.list_keys(RECORDS):
            if not key.endswith(".json"):
                continue
            try:
                data = store.read_bytes(key)
            except LifecycleError:
                if store.exists(key):  # not "gone since the listing": an error to report, not to skip
                    raise
                continue
            try:
                record = parse_record(EmbeddingSet, data)
            except ValueError as exc:  # pydantic's ValidationError, for bad JSON too
                out.unreadable.setdefault(_dataset_of(data), f"embedding set record {key} cannot be read "
                                                             f"({str(exc).splitlines()[0]})")
                continue
            out.sets[record.dataset][record.id] = record
        return out

    def unclear(self, dataset: str) -> str | None:
        return self.unreadable.get(dataset) or self.unreadable.get("")


def _latest(store: ObjectStore, name: str) -> tuple[EmbeddingSet | None, str | None]:
    """The dataset's latest set (the pointer the embed stage reads), or why it cannot be read."""
    key = latest_key(EmbeddingSet, name)
    if not store.exists(key):
        return None, None
    try:
        return parse_record(EmbeddingSet, store.read_bytes(key)), None
    except ValueError as exc:
        return None, f"the latest embedding set pointer {key} cannot be read ({str(exc).splitlines()[0]})"


def broken_chain(sets: dict[str, EmbeddingSet]) -> str | None:
    """Why the `extends` links of a dataset's sets cannot be trusted, or None when they can."""
    for s in sorted(sets.values(), key=lambda s: s.id):
        if s.extends is None:
            continue
        base = sets.get(s.extends)
        if base is None:
            return f"embedding set {s.id} extends set {s.extends}, whose record is missing"
        if s.parts[:len(base.parts)] != base.parts:
            return f"embedding set {s.id} does not start with the parts of set {s.extends}, which it extends"
    return None


def _label(s: EmbeddingSet) -> str:
    return f"set {s.id} (dataset version {s.dataset_version})"


def plan_embeddings(store: ObjectStore, name: str, policy: RetentionPolicy, protect: Protection,
                    kept_ids: dict[str, list[str]], records: EmbeddingRecords, now: float) -> Plan:
    """The part files of a dataset's embedding sets that no kept set lists, and the records they break.

    Args:
        kept_ids: The dataset version ids the table plan keeps, with why (empty: no table).
        records: Every EmbeddingSet record of the store (`EmbeddingRecords.load`).
    """
    prefix = embeddings_prefix(name)
    files = {f"{prefix}/{rel}": info for rel, info in list_objects(store, prefix).items()}
    sets = dict(records.sets.get(name, {}))
    latest, unreadable_latest = _latest(store, name)
    if latest is not None:
        sets.setdefault(latest.id, latest)
    if not files and not sets and unreadable_latest is None:
        return [], []
    unclear = (protect.unresolved.get(name) or records.unclear(name) or unreadable_latest
               or (None if kept_ids else "no Delta table: which dataset versions are kept is unknown")
               or broken_chain(sets))
    if unclear:
        return [], [Item(area="embeddings", dataset=name, what="every file", why=unclear)]

    indexed = protect.sets.get(name, {})
    whys: dict[str, list[str]] = {}
    for s in sets.values():
        version_whys = "; ".join(dict.fromkeys(kept_ids.get(s.dataset_version, [])))
        found = [*([f"its dataset version is kept ({version_whys})"] if version_whys else []),
                 *(f"the index of {why} was built from it" for why in indexed.get(s.id, []))]
        if found:
            whys[s.id] = found
    if latest is not None:
        whys.setdefault(latest.id, []).append("the latest set (a later append extends it)")
    keep_keys = {p for sid in whys for p in sets[sid].parts}
    owners: dict[str, list[str]] = defaultdict(list)
    for s in sets.values():
        for p in s.parts:
            owners[p].append(s.id)
    newest: dict[str, float] = {}  # set folder -> its newest file's mtime (no mtime: now, i.e. young)
    for key, info in files.items():
        folder = posixpath.dirname(key)
        newest[folder] = max(newest.get(folder, 0.0), object_mtime(info) or now)

    def size(key: str) -> int:
        return int(files.get(key, {}).get("size") or 0)

    remove: list[Item] = []
    kept = [Item(area="embeddings", dataset=name, what=_label(sets[sid]), why="; ".join(dict.fromkeys(whys[sid])),
                 bytes=sum(size(p) for p in sets[sid].parts)) for sid in sorted(whys)]
    doomed: set[str] = set()
    for key in sorted(files):
        if key in keep_keys:
            continue
        if now - newest[posixpath.dirname(key)] < policy.min_age.total_seconds():
            kept.append(Item(area="embeddings", dataset=name, what=key, bytes=size(key),
                             why=f"younger than {policy.min_age} (its folder's newest file): may be an embed in "
                                 "flight"))
            continue
        why = (f"listed only by set(s) {', '.join(sorted(owners[key]))}, none of them kept"
               if key in owners else "in no embedding set (left by an embed that did not finish)")
        remove.append(Item(area="embeddings", dataset=name, what=key, bytes=size(key), why=why))
        doomed.add(key)
    for s in sorted(sets.values(), key=lambda s: s.id):
        if s.id in whys:
            continue
        lost = [p for p in s.parts if p in doomed or p not in files]
        if lost:
            remove.append(Item(area="embeddings", dataset=name, what=record_key(EmbeddingSet, s.id),
                               why=f"{_label(s)} loses {len(lost)} of its {len(s.parts)} parts: deleted so that "
                                   "the embed stage does not reuse it (a rerun embeds again)"))
        else:
            kept.append(Item(area="embeddings", dataset=name, what=_label(s),
                             why="its parts all stay (in a kept set: an append starts with them)"
                                 if all(p in keep_keys for p in s.parts) else
                                 f"its parts all stay (younger than {policy.min_age})"))
    return remove, kept


def apply_embeddings(store: ObjectStore, name: str, items: list[Item], policy: RetentionPolicy) -> Plan:
    """Delete the planned records, then the planned parts still old (one rewritten since the plan stays)."""
    records = [i for i in items if i.what.startswith(f"{RECORDS}/")]
    for item in records:  # first: a record never outlives its parts
        store.delete(item.what)
    prefix = embeddings_prefix(name)
    files = {f"{prefix}/{rel}": info for rel, info in list_objects(store, prefix).items()}
    now = time.time()
    parts: list[Item] = []
    kept: list[Item] = []
    for item in items:
        if item.what not in files:  # a record, or a part gone already (a retry finds nothing to do)
            continue
        if now - (object_mtime(files[item.what]) or now) < policy.min_age.total_seconds():
            kept.append(item.model_copy(update={"why": "written since the plan"}))
        else:
            parts.append(item)
    doomed = [i.what for i in parts]
    fs = store.filesystem()
    with store.unreachable_as_error(prefix):
        if doomed:
            fs.rm([store.path(k) for k in doomed])
        if store.protocol == "file":  # a file lake keeps empty set folders; S3 has none
            for folder in sorted({posixpath.dirname(k) for k in doomed}, reverse=True):
                with suppress(OSError):
                    fs.rmdir(store.path(folder))
    return [*parts, *records], kept
