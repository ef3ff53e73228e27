"""Register flow: a trained model → a registry version, `@challenger` always, `@champion` when it wins."""

from __future__ import annotations

import sys

from prefect import flow

from infra_blocks import MlflowTarget, ObjectStore
from lifecycle.records import ModelVersion, TrainedModel, code_version
from lifecycle.spec import DatasetSpec
from tasks.records import announce, find_record, publish_record


def register_code_version() -> str:
    import tasks.promotion
    import tasks.registry

    return code_version(tasks.registry, tasks.promotion, sys.modules[__name__])


@flow(name="register", log_prints=True)
def register(spec: DatasetSpec, trained: TrainedModel, store: ObjectStore, mlflow: MlflowTarget) -> ModelVersion:
    """Register once per (trained model, model name, promotion rule, code); a cached decision is returned.

    The champion alias moves together with the record: it is set, the record is published, and if
    publishing fails the alias goes back to the previous champion. A promotion is also audited (the
    chain `lifecycle rollback` walks) and announces `lifecycle.model.promoted`, which the deploy
    trigger listens for.

    Raises:
        MlflowUnavailableError: MLflow stayed unreachable through the retries (one line; the champion
            is unchanged and no record was written).
    """
    from tasks.promotion import register_audit
    from tasks.registry import (PROMOTED_EVENT, model_version_id, register_task, restore_champion_task,
                                set_champion_task)

    version = register_code_version()
    record_id = model_version_id(trained, mlflow.model_name(spec.name), spec.train.promotion_margin, version)
    cached = find_record(store, ModelVersion, record_id)
    if cached is not None:
        return cached
    record = register_task(spec, trained, store, mlflow, record_id, version)
    if not record.promoted:
        publish_record(store, record)
        return record
    previous = set_champion_task(mlflow, record)
    try:
        publish_record(store, record)
    except BaseException:
        if previous != record.version:
            restore_champion_task(mlflow, record, previous)
        raise
    if previous != record.version:
        publish_record(store, register_audit(record, previous))
    announce(record, PROMOTED_EVENT)
    print(f"{record.model_name} v{record.version} is the champion: {record.decision}")
    return record
