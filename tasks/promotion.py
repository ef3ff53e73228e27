"""Moving `champion` by hand: `lifecycle promote` (gated like the register stage) and `lifecycle rollback`.

Why this shape:
- Every decision, a refused promotion included, is a `PromotionAudit` record in the store AND tags on
  the model version(s) in MLflow, so "who moved champion, when and why" has the same answer in both.
- Rollback walks the audit chain rather than guessing "version - 1": the champion before v7 may be v3
  (v4-v6 were never promoted), and after a rollback the next one goes further back, not forward.
- A manual promotion is judged exactly as the register stage judges: the version's own holdout, the
  current champion scored on those rows through its pyfunc, the spec's metric and margin. `force`
  overrides the judgement and says so in the record.
- The register stage writes an audit for each automatic promotion too (`register_audit`); for models
  promoted before audits existed, the promoted ModelVersion records stand in for them.
"""

from __future__ import annotations

import getpass
from typing import Any

from infra_blocks import MlflowTarget, ObjectStore
from lifecycle.errors import LifecycleError
from lifecycle.records import (DatasetVersion, ModelVersion, PromotionAudit, TrainedModel, parse_record, stable_hash,
                               utcnow)
from lifecycle.spec import DatasetSpec
from tasks.records import find_record, save_record
from tasks.registry import CHAMPION, TAG, champion_version, judge, reaching


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


def register_audit(record: ModelVersion, previous: str | None) -> PromotionAudit:
    """The audit of an automatic promotion by the register stage."""
    return new_audit(record.dataset, record.model_name, "register", record.version, previous, True, record.decision,
                     "register stage", {"model_version": record.id})


def audits(store: ObjectStore, model_name: str) -> list[PromotionAudit]:
    """Every audit of a registered model, oldest first."""
    found = [parse_record(PromotionAudit, store.read_bytes(k)) for k in store.list_keys(f"records/{PromotionAudit.kind}")]
    return sorted((a for a in found if a.model_name == model_name), key=lambda a: a.created_at)


def _model_versions(store: ObjectStore, model_name: str) -> list[ModelVersion]:
    found = [parse_record(ModelVersion, store.read_bytes(k)) for k in store.list_keys(f"records/{ModelVersion.kind}")]
    return sorted((m for m in found if m.model_name == model_name), key=lambda m: m.created_at)


def model_version_record(store: ObjectStore, model_name: str, version: str) -> ModelVersion | None:
    """The newest ModelVersion record of a registry version (the record deploy needs)."""
    matches = [m for m in _model_versions(store, model_name) if m.version == version]
    return matches[-1] if matches else None


def previous_champion(store: ObjectStore, model_name: str, version: str) -> str | None:
    """The champion `version` replaced when it last became champion by promotion (not by a rollback)."""
    for audit in reversed(audits(store, model_name)):
        if audit.moved and audit.action != "rollback" and audit.version == version:
            return audit.previous
    for record in reversed(_model_versions(store, model_name)):  # promoted before audits existed
        if record.promoted and record.version == version:
            return record.champion_version
    return None


def audited_champion(store: ObjectStore, dataset: str, model_name: str) -> ModelVersion | None:
    """The champion according to the store: the newest audit that moved it, else the newest promoted
    record. What a deploy after a manual promote/rollback should serve (MLflow's alias says the same)."""
    moved = [a for a in audits(store, model_name) if a.moved and a.dataset == dataset]
    if moved:
        return model_version_record(store, model_name, moved[-1].version)
    promoted = [m for m in _model_versions(store, model_name) if m.promoted and m.dataset == dataset]
    return promoted[-1] if promoted else None


def _tag_decision(target: MlflowTarget, audit: PromotionAudit) -> None:
    """The decision on the version it concerns, on the demoted champion, and on the registered model."""
    client = target.client()
    text = f"{audit.action} by {audit.actor}: {audit.decision}"
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
        record = model_version_record(store, name, version)
        audit = new_audit(spec.name, name, "promote", version, previous, moved, text, who,
                          {"model_version": record.id} if record else {})
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
    """Point `champion` back at the version the current champion replaced (from the audit chain).

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
        back = previous_champion(store, name, now)
        if back is None:
            raise LifecycleError(f"{name}@{CHAMPION} is v{now}: the audit trail in {store.url} names no champion "
                                 "before it")
        record = model_version_record(store, name, back)
        text = f"rolled back: v{back} is the champion again, v{now} demoted" + (f" ({reason})" if reason else "")
        audit = new_audit(dataset, name, "rollback", back, now, True, text, who,
                          {"model_version": record.id} if record else {})
        client.set_registered_model_alias(name, CHAMPION, back)
        save_record(store, audit)
        _tag_decision(target, audit)
    return audit


def champion_summary(store: ObjectStore, model_name: str, limit: int = 10) -> list[dict[str, Any]]:
    """The latest decisions, newest first (for the CLI)."""
    return [{"when": a.created_at.strftime("%Y-%m-%d %H:%M:%S"), "action": a.action, "version": a.version,
             "previous": a.previous or "", "moved": a.moved, "actor": a.actor, "decision": a.decision}
            for a in reversed(audits(store, model_name)[-limit:])]
