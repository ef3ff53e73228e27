"""Register flow: a trained model → a registry version, `@challenger` always, `@champion` when it wins."""

from __future__ import annotations

import sys

from prefect import flow

from flows.runner import Call, Input, Stage, produce
from infra_blocks import MlflowTarget, ObjectStore
from lifecycle.records import ModelVersion, TrainedModel, code_version
from lifecycle.spec import DatasetSpec
from tasks.records import announce, publish_record


def register_code_version() -> str:
    import tasks.promotion
    import tasks.registry

    return code_version(tasks.registry, tasks.promotion, sys.modules[__name__])


@flow(name="register", log_prints=True)
def register(spec: DatasetSpec, trained: TrainedModel, store: ObjectStore, mlflow: MlflowTarget) -> ModelVersion:
    """Register once per (trained model, model name, promotion rule, code); a cached decision is returned.

    Raises:
        MlflowUnavailableError: MLflow stayed unreachable through the retries (one line; the champion
            is unchanged and no record was written).
    """
    return produce(STAGE, Call(spec, store, {"model": trained}, (mlflow,)))


def _record_id(call: Call) -> str:
    from tasks.registry import model_version_id

    name = call.block(MlflowTarget).model_name(call.spec.name)
    cfg = call.spec.train
    return model_version_id(call.get(TrainedModel), name, cfg.promotion_margin, register_code_version(),
                            (cfg.require_beats_baseline, cfg.baseline_margin))


def _work(call: Call, record_id: str | None) -> ModelVersion:
    from tasks.registry import register_task

    assert record_id is not None
    return register_task(call.spec, call.get(TrainedModel), call.store, call.block(MlflowTarget), record_id,
                         register_code_version())


def _publish(call: Call, record: ModelVersion) -> None:
    """Publish the record; a promotion moves the champion alias together with it.

    The alias is set, the record is published, and if publishing fails the alias goes back to the
    previous champion. A promotion is also audited (the chain `lifecycle rollback` walks back) and
    announces `lifecycle.model.promoted`, which the deploy trigger listens for.
    """
    from tasks.promotion import audit_promotion_task
    from tasks.registry import PROMOTED_EVENT, restore_champion_task, set_champion_task

    store, mlflow = call.store, call.block(MlflowTarget)
    if not record.promoted:
        publish_record(store, record)
        return
    previous = set_champion_task(mlflow, record)
    try:
        publish_record(store, record)
    except BaseException:
        if previous != record.version:
            restore_champion_task(mlflow, record, previous)
        raise
    if previous != record.version:
        audit_promotion_task(store, mlflow, record, previous)
    announce(record, PROMOTED_EVENT)
    print(f"{record.model_name} v{record.version} is the champion: {record.decision}")


STAGE = Stage(name="register", record=ModelVersion, inputs=(Input("model", "trained"),), blocks=("mlflow",),
              flow=register, work=_work, record_id=_record_id, publish=_publish)
