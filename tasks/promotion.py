"""Who is champion, and moving it by hand: `lifecycle promote` (gated like register) and `lifecycle rollback`.

Why this shape:
- The MLflow alias `models:/NAME@champion` is the one source of truth for who is champion: deploy,
  promote and rollback all start from `get_model_version_by_alias`. The store holds no second answer.
- Every decision, a refused promotion included, is a `PromotionAudit` record in the store AND tags on
  the model version(s) in MLflow. The audits are the alias's history, linked like a list: each move
  names, in `inputs["promotion"]`, the promotion that put the champion it builds on in place, and
  the champion's version carries the id of the audit that made it champion (`lifecycle.champion_audit`).
  Rollback therefore reads one or two audit records, walking back from the champion, where it used
  to list every audit and model-version record of the store on each run.
- Rollback walks that chain rather than guessing "version - 1": the champion before v7 may be v3
  (v4-v6 were never promoted), and after a rollback the next one goes further back, not forward.
- A manual promotion is judged exactly as the register stage judges: the version's own holdout, the
  current champion scored on those rows through its pyfunc, the spec's metric and margin. `force`
  overrides the judgement and says so in the record.
- Versions promoted before the chain existed fall back to what register tagged on them
  (`lifecycle.promoted`, `lifecycle.champion_version`), and their record to a listing of records.
"""

from __future__ import annotations

import getpass
from typing import Any

from prefect import task

from infra_blocks import MlflowTarget, ObjectStore
from lifecycle.errors import LifecycleError
from lifecycle.records import (
    DatasetVersion,
    ModelVersion,
    PromotionAudit,
    TrainedModel,
    parse_record,
    stable_hash,
    utcnow,
)
from lifecycle.spec import DatasetSpec
from tasks.records import announce, find_record, save_record
from tasks.registry import CHAMPION, MLFLOW_RETRY, TAG, champion_version, judge, reaching

CHAMPION_AUDIT = f"{TAG}champion_audit"  # version tag: the audit that last made this version champion
RECORD_TAG = f"{TAG}record"  # version tag: the version's ModelVersion record (tasks/registry.py)
LINK = PromotionAudit.kind  # audit input: the promotion the champion it builds on came from


def _actor(actor: str | None) -> str:
    if actor:
        return actor
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        return "unknown"


def new_audit(dataset: str, model_name: str, action: str, version: str, previous: str | None, moved: bool,
              decision: str, actor: str, inputs: dict[str, str] | None = None) -> PromotionAudit:
    """An audit record; its id hashes the decision and its time (audits are events, not content)."""
    now = utcnow()
    return PromotionAudit(id=stable_hash(model_name, action, version, previous, moved, now.isoformat()),
                          dataset=dataset, created_at=now, model_name=model_name, action=action, version=version,
                          previous=previous, moved=moved, decision=decision, actor=actor, inputs=inputs or {})


def register_audit(store: ObjectStore, target: MlflowTarget, record: ModelVersion,
                   previous: str | None) -> PromotionAudit:
    """The audit of an automatic promotion by the register stage, linked to the champion it replaced."""
    behind = None
    if previous is not None:
        with reaching(target, f"reading {record.model_name} v{previous}", "the promotion has no audit"):
            behind = promotion_in_effect(store, target.client().get_model_version(record.model_name, previous))
    return new_audit(record.dataset, record.model_name, "register", record.version, previous, True, record.decision,
                     "register stage", {"model_version": record.id, **_link(behind)})


@task(name="audit-promotion", tags=["lifecycle", "register"], **MLFLOW_RETRY)
def audit_promotion_task(store: ObjectStore, target: MlflowTarget, record: ModelVersion,
                         previous: str | None) -> PromotionAudit:
    """Save, announce and tag the audit of a promotion the register stage made (after the alias moved)."""
    audit = register_audit(store, target, record, previous)
    save_record(store, audit)
    announce(audit)
    with reaching(target, f"tagging {record.model_name} v{record.version}", "the promotion has no audit tags"):
        _tag_decision(target, audit)
    return audit


def audits(store: ObjectStore, model_name: str) -> list[PromotionAudit]:
    """Every audit of a registered model, oldest first: a listing of the store, for people and tests.

    No stage and no command reads it: they walk the chain back from the champion.
    """
    keys = store.list_keys(f"records/{PromotionAudit.kind}")
    found = [parse_record(PromotionAudit, store.read_bytes(k)) for k in keys]
    return sorted((a for a in found if a.model_name == model_name), key=lambda a: a.created_at)


def model_version_record(store: ObjectStore, model_name: str, version: str) -> ModelVersion | None:
    """The newest ModelVersion record of a registry version, by listing the records: only for versions
    registered before `lifecycle.record` was tagged on them."""
    found = [parse_record(ModelVersion, store.read_bytes(k)) for k in store.list_keys(f"records/{ModelVersion.kind}")]
    matches = sorted((m for m in found if m.model_name == model_name and m.version == version),
                     key=lambda m: m.created_at)
    return matches[-1] if matches else None


def record_of(store: ObjectStore, mv: Any) -> ModelVersion | None:
    """The ModelVersion record of a registry version (`mv` as MLflow returns it, with its tags)."""
    record_id = mv.tags.get(RECORD_TAG)
    if record_id:
        return find_record(store, ModelVersion, record_id)
    return model_version_record(store, mv.name, str(mv.version))


def champion_record(store: ObjectStore, target: MlflowTarget, dataset: str,
                    made: ModelVersion | None = None) -> ModelVersion | None:
    """The record of the version `@champion` points at now (None: no champion yet): what deploy serves.

    Args:
        made: a record the caller already holds (this run's register); returned when it is the champion's.

    Raises:
        LifecycleError: the champion's version has no record in the store.
        MlflowUnavailableError: the tracking server could not be reached.
    """
    name = target.model_name(dataset)
    with reaching(target, f"reading {name}@{CHAMPION}", "nothing was deployed"):
        mv = champion_version(target.client(), name)
    if mv is None:
        return None
    if made is not None and made.model_name == name and made.version == str(mv.version):
        return made
    record = record_of(store, mv)
    if record is None:
        raise LifecycleError(f"{name}@{CHAMPION} is v{mv.version}, which has no ModelVersion record in {store.url}")
    return record


def champion_audit(store: ObjectStore, mv: Any) -> PromotionAudit | None:
    """The audit that made `mv` champion (the head of the chain), if it is tagged and still in the store."""
    audit_id = mv.tags.get(CHAMPION_AUDIT)
    audit = find_record(store, PromotionAudit, audit_id) if audit_id else None
    return audit if audit is not None and audit.moved and audit.version == str(mv.version) else None


def promotion_in_effect(store: ObjectStore, mv: Any) -> PromotionAudit | None:
    """The promotion (register or promote) that put champion `mv` in place: its own audit, or for a
    rollback the promotion that rollback went back to. Reads one or two records."""
    head = champion_audit(store, mv)
    if head is None or head.action != "rollback":
        return head
    link = head.inputs.get(LINK)
    return find_record(store, PromotionAudit, link) if link else None


def _link(audit: PromotionAudit | None) -> dict[str, str]:
    return {LINK: audit.id} if audit is not None else {}


def previous_champion(store: ObjectStore, mv: Any) -> tuple[str | None, PromotionAudit | None]:
    """The champion `mv` replaced when it became champion by promotion, and the promotion that had made
    that one champion (what a rollback restores); (None, None) when there was none."""
    undone = promotion_in_effect(store, mv)
    if undone is not None:
        link = undone.inputs.get(LINK)
        return undone.previous, find_record(store, PromotionAudit, link) if link else None
    if mv.tags.get(f"{TAG}promoted") == "true":  # promoted by register before audits were linked
        return mv.tags.get(f"{TAG}champion_version") or None, None
    return None, None


def champion_history(store: ObjectStore, target: MlflowTarget, dataset: str, limit: int = 10) -> list[PromotionAudit]:
    """The moves behind the current champion, newest first, read back one audit at a time (for the CLI)."""
    name = target.model_name(dataset)
    with reaching(target, f"reading {name}@{CHAMPION}"):
        mv = champion_version(target.client(), name)
    trail: list[PromotionAudit] = []
    audit = champion_audit(store, mv) if mv is not None else None
    while audit is not None and len(trail) < limit:
        trail.append(audit)
        link = audit.inputs.get(LINK)
        audit = find_record(store, PromotionAudit, link) if link else None
    return trail


def _tag_decision(target: MlflowTarget, audit: PromotionAudit) -> None:
    """The decision on the version it concerns, on the demoted champion, and on the registered model; a
    move also makes the audit the head of the chain (`lifecycle.champion_audit` on the new champion)."""
    client = target.client()
    text = f"{audit.action} by {audit.actor}: {audit.decision}"
    if audit.moved:
        client.set_model_version_tag(audit.model_name, audit.version, CHAMPION_AUDIT, audit.id)
    client.set_model_version_tag(audit.model_name, audit.version, f"{TAG}decision", audit.decision)
    client.set_model_version_tag(audit.model_name, audit.version, f"{TAG}audit.{audit.id}", text[:5000])
    if audit.moved and audit.previous and audit.previous != audit.version:
        client.set_model_version_tag(audit.model_name, audit.previous, f"{TAG}audit.{audit.id}",
                                     f"demoted: v{audit.version} replaced it ({audit.action} by {audit.actor})")
    client.set_registered_model_tag(audit.model_name, f"{TAG}champion_decision", f"{audit.id}: {text}"[:5000])


def _get_version(client: Any, name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise LifecycleError(f"model {name} has no version {version!r}") from exc
        raise


def judging_spec(store: ObjectStore, target: MlflowTarget, dataset: str, version: str) -> DatasetSpec:
    """The spec to judge `version` with: the one its dataset version was ingested with, else the
    dataset's registered spec (`lifecycle register`)."""
    from tasks.specs import registered_spec, spec_for

    name = target.model_name(dataset)
    with reaching(target, f"reading {name} v{version}"):
        mv = _get_version(target.client(), name, version)
    trained = find_record(store, TrainedModel, mv.tags.get(f"{TAG}trained_model", ""))
    dataset_version = find_record(store, DatasetVersion, trained.dataset_version) if trained else None
    return spec_for(store, dataset_version) if dataset_version else registered_spec(store, dataset)


def promote_version(spec: DatasetSpec, store: ObjectStore, target: MlflowTarget, version: str, *,
                    force: bool = False, reason: str = "", actor: str | None = None) -> PromotionAudit:
    """Make registry `version` the champion if it beats the current one (or `force`); always audited.

    Returns:
        The saved audit; `moved` says whether `champion` now points at `version`.

    Raises:
        LifecycleError: no such version, no training record to judge it by (without `force`).
        MlflowUnavailableError: the tracking server could not be reached (nothing was moved).
    """
    name, who = target.model_name(spec.name), _actor(actor)
    with reaching(target, f"promoting {name} v{version}"):
        client = target.client()
        mv = _get_version(client, name, version)
        current = champion_version(client, name)
        previous = str(current.version) if current is not None else None
        trained_id = mv.tags.get(f"{TAG}trained_model", "")
        trained = find_record(store, TrainedModel, trained_id) if trained_id else None
        note = f" ({reason})" if reason else ""
        if previous == version:
            moved, text = False, f"v{version} is already the champion"
        elif force:
            moved, text = True, f"promoted by hand over v{previous or '-'} without comparison (--force){note}"
        elif trained is None:
            raise LifecycleError(f"{name} v{version}: no training record {trained_id or '(untagged)'} in "
                                 f"{store.url} to compare it with the champion; use --force to promote anyway")
        else:
            _dataset_check(store, trained, spec)
            moved, text, _ = judge(spec, trained, store, name, version, current)
            text += note
        record = record_of(store, mv)
        behind = promotion_in_effect(store, current) if moved and current is not None else None
        audit = new_audit(spec.name, name, "promote", version, previous, moved, text, who,
                          {**({"model_version": record.id} if record else {}), **_link(behind)})
        if moved:
            client.set_registered_model_alias(name, CHAMPION, version)
        save_record(store, audit)  # right after the move: a moved alias always has its audit
        _tag_decision(target, audit)
    return audit


def _dataset_check(store: ObjectStore, trained: TrainedModel, spec: DatasetSpec) -> None:
    dataset = find_record(store, DatasetVersion, trained.dataset_version)
    if dataset is None:
        raise LifecycleError(f"dataset version {trained.dataset_version} (the holdout to judge on) is not in "
                             f"{store.url}; use --force to promote without comparison")
    if dataset.dataset != spec.name:
        raise LifecycleError(f"model trained on dataset {dataset.dataset!r}, spec is for {spec.name!r}")


def rollback_champion(dataset: str, store: ObjectStore, target: MlflowTarget, *, reason: str = "",
                      actor: str | None = None) -> PromotionAudit:
    """Point `champion` back at the version the current champion replaced, read back from its audit.

    Raises:
        LifecycleError: no champion, or no earlier champion in the audit chain.
        MlflowUnavailableError: the tracking server could not be reached (nothing was moved).
    """
    name, who = target.model_name(dataset), _actor(actor)
    with reaching(target, f"rolling back {name}@{CHAMPION}"):
        client = target.client()
        current = champion_version(client, name)
        if current is None:
            raise LifecycleError(f"model {name} has no champion to roll back")
        now = str(current.version)
        back, restored = previous_champion(store, current)
        if back is None:
            raise LifecycleError(f"{name}@{CHAMPION} is v{now}: the audit trail in {store.url} names no champion "
                                 "before it")
        record = record_of(store, _get_version(client, name, back))
        text = f"rolled back: v{back} is the champion again, v{now} demoted" + (f" ({reason})" if reason else "")
        audit = new_audit(dataset, name, "rollback", back, now, True, text, who,
                          {**({"model_version": record.id} if record else {}), **_link(restored)})
        client.set_registered_model_alias(name, CHAMPION, back)
        save_record(store, audit)
        _tag_decision(target, audit)
    return audit


def champion_summary(store: ObjectStore, target: MlflowTarget, dataset: str, limit: int = 10) -> list[dict[str, Any]]:
    """The moves behind the current champion, newest first, as rows (for the CLI)."""
    return [{"when": a.created_at.strftime("%Y-%m-%d %H:%M:%S"), "action": a.action, "version": a.version,
             "previous": a.previous or "", "moved": a.moved, "actor": a.actor, "decision": a.decision}
            for a in champion_history(store, target, dataset, limit)]
