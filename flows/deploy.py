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
"""

from __future__ import annotations

from prefect import flow

from infra_blocks import MlflowTarget, ObjectStore, ServingTarget, VectorStore
from lifecycle.errors import LifecycleError
from lifecycle.records import Deployment, IndexVersion, ModelVersion, TrainedModel
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
        LifecycleError: the new server failed; the previous one still serves (docker) or was restored
            (process), and the message says which.
    """
    check_exposure(serving)
    dep_id = deployment_id(model, index, serving)
    cached = find_record(store, Deployment, dep_id)
    if cached is not None and cached.status == "serving" and serving_now_task(serving, dep_id) is not None:
        return cached
    lineage = deployment_lineage(spec, model, index, store, dep_id)
    record = Deployment(
        id=dep_id,
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
        snapshot = prepare_snapshot_task(serving, mlflow, model, index, vectors if index else None, lineage)
        image = prepare_image_task(serving, snapshot)
        if image is not None:
            record = record.model_copy(update={"image_digest": image.id, "image_size_mb": image.size_mb})
        server, previous = rollout_task(serving, snapshot, image)
        handle = server.handle
    except LifecycleError as exc:
        failed = record.model_copy(update={"status": "failed", "reason": str(exc).splitlines()[0]})
        publish_record(store, failed, FAILED_EVENT)
        raise
    record = record.model_copy(update={"handle": handle, "previous": previous})
    publish_record(store, record)
    image_note = f", image {record.image_digest[7:19]} {record.image_size_mb} MB" if record.image_digest else ""
    print(f"deployment {dep_id}: {model.model_name} v{model.version} on {serving.endpoint} ({serving.kind} "
          f"{handle}{image_note})")
    return record
