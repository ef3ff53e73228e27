"""Deploy flow: serve a registered model version (and the index) on the serving target.

A deployment's id comes from the model version, the index version, the target's address and the
served code (`serving.manifest`), so re-running on unchanged inputs while that server still answers
is a no-op that returns the stored record. Anything else rolls out through the backend of the
target's kind (`tasks.serving.backend_for`): snapshot, then what the backend prepares, then its rollout:
- process target: stop old, start new, smoke-test; on failure restart the old one
  (tasks/process_serving.py);
- docker target: image (offline, tasks/docker_images.py), new container beside the old one, smoke
  test, switch the edge, stop the old; on failure the old one never stopped serving
  (tasks/docker_serving.py).
Every rollout is recorded: a failed one publishes its Deployment with status `failed` and the reason
(event `lifecycle.model.deploy_failed`) before the flow fails with that reason.

Why this shape: deploy is a row of the stage table like every other stage (`STAGE`, run by
`flows.runner.produce`); what is its own is small: the exposure check (`require`), a stored record
stands only while its server answers (`reuse`), and a failed rollout is published by the work itself,
since `produce` publishes only what the work returns.
"""

from __future__ import annotations

from prefect import flow

from flows.runner import Call, Input, Stage, produce
from infra_blocks import MlflowTarget, ObjectStore, ServingTarget, VectorStore
from lifecycle.errors import LifecycleError
from lifecycle.records import Deployment, IndexVersion, ModelVersion, Record, TrainedModel
from lifecycle.spec import DatasetSpec
from tasks.records import find_record, publish_record
from tasks.serving import (
    check_exposure,
    deployment_id,
    prepare_image_task,
    prepare_snapshot_task,
    rollout_task,
    serving_code_version,
    serving_now_task,
)

FAILED_EVENT = "lifecycle.model.deploy_failed"


def deployment_lineage(spec: DatasetSpec, model: ModelVersion, index: IndexVersion | None, store: ObjectStore,
                       deployment: str) -> dict[str, str | None]:
    """What `/version` reports: the chain of records behind the served model and index."""
    trained = find_record(store, TrainedModel, model.trained_model)
    dataset_version = trained.dataset_version if trained else (index.dataset_version if index else None)
    return {
        "dataset": spec.name,
        "dataset_version": dataset_version,
        "model_name": model.model_name,
        "model_version": model.version,
        "model_record": model.id,
        "run_id": model.run_id,
        "index_version": index.id if index else None,
        "index_tag": index.tag if index else None,
        "deployment_id": deployment,
    }


@flow(name="deploy", log_prints=True)
def deploy(spec: DatasetSpec, model: ModelVersion, index: IndexVersion | None, store: ObjectStore,
           mlflow: MlflowTarget, vectors: VectorStore, serving: ServingTarget) -> Deployment:
    """Serve `model` (+ `index`) on `serving`; the stored record is returned while its server answers.

    Raises:
        LifecycleError: the serving target is exposed without a token (nothing rolled out), or the new
            server failed; the previous one still serves (docker) or was restored (process), and the
            message says which.
    """
    return produce(STAGE, Call(spec, store, {"model_version": model, "index": index}, (mlflow, vectors, serving)))


def _require(call: Call) -> None:
    """Refuse a target reachable beyond this machine without a token, before anything is rolled out."""
    check_exposure(call.block(ServingTarget))


def _record_id(call: Call) -> str:
    return deployment_id(call.get(ModelVersion), call.maybe(IndexVersion), call.block(ServingTarget))


def _serving(call: Call, record: Deployment) -> bool:
    """A stored record stands only while that deployment is the target's live server and answers.

    A `failed` record, or one whose server was stopped or replaced, rolls out again under the same id.
    """
    return record.status == "serving" and serving_now_task(call.block(ServingTarget), record.id) is not None


def _work(call: Call, record_id: str | None) -> Deployment:
    """Snapshot, prepare and roll out; returns the unpublished `serving` record.

    Raises:
        LifecycleError: the rollout failed; its `failed` record (with the reason's first line) is
            published here first, so every rollout leaves a record while the old server keeps serving.
    """
    assert record_id is not None
    spec, store, model, index = call.spec, call.store, call.get(ModelVersion), call.maybe(IndexVersion)
    serving, vectors = call.block(ServingTarget), call.block(VectorStore)
    lineage = deployment_lineage(spec, model, index, store, record_id)
    record = Deployment(
        id=record_id,
        dataset=spec.name,
        code_version=serving_code_version(),
        inputs={"model_version": model.id, **({"index": index.id} if index else {})},
        model_name=model.model_name,
        model_version=model.version,
        index_version=index.id if index else None,
        target=serving.kind,
        endpoint=serving.endpoint,
        handle="",
        status="serving",
    )
    try:
        snapshot = prepare_snapshot_task(serving, call.block(MlflowTarget), model, index,
                                         vectors if index else None, lineage)
        image = prepare_image_task(serving, snapshot)
        if image is not None:
            record = record.model_copy(update={"image_digest": image.id, "image_size_mb": image.size_mb})
        server, previous = rollout_task(serving, snapshot, image)
    except LifecycleError as exc:
        failed = record.model_copy(update={"status": "failed", "reason": str(exc).splitlines()[0]})
        publish_record(store, failed, FAILED_EVENT)
        raise
    return record.model_copy(update={"handle": server.handle, "previous": previous})


def _publish(call: Call, record: Deployment) -> None:
    """Publish the record, then say what now serves where (the line once the record is stored)."""
    publish_record(call.store, record)
    serving = call.block(ServingTarget)
    image_note = f", image {record.image_digest[7:19]} {record.image_size_mb} MB" if record.image_digest else ""
    print(f"deployment {record.id}: {record.model_name} v{record.model_version} on {serving.endpoint} "
          f"({serving.kind} {record.handle}{image_note})")


def _champion(call: Call) -> Record | None:
    """Deploy serves the champion: the version `@champion` points at now, whichever run promoted it."""
    from tasks.promotion import champion_record

    return champion_record(call.store, call.block(MlflowTarget), call.spec.name, made=call.maybe(ModelVersion))


def _latest_index(call: Call) -> Record | None:
    """Deploy started alone without an index: the dataset's newest one (search serves the newest data)."""
    from tasks.records import latest_record

    return latest_record(call.store, IndexVersion, call.spec.name) if call.spec.text_column else None


STAGE = Stage(
    name="deploy", record=Deployment,
    inputs=(Input("model_version", "model", pick=_champion, missing="no champion"),
            Input("index", "index", optional=True, find=_latest_index)),
    blocks=("mlflow", "vectors", "serving"), flow=deploy,
    work=_work, record_id=_record_id, require=_require, reuse=_serving, publish=_publish,
)
