"""Deploy flow: serve a registered model version (and the index) on the serving target.

A deployment's id comes from the model version, the index version, the target's address and the
serving code, so re-running on unchanged inputs while that server still answers is a no-op that
returns the stored record. Anything else rolls out: snapshot, stop old, start new, smoke-test, and
on failure restore the old one (tasks/serving.py).
"""

from __future__ import annotations

from prefect import flow

from infra_blocks import MlflowTarget, ObjectStore, ServingTarget, VectorStore
from lifecycle.errors import LifecycleError
from lifecycle.records import Deployment, IndexVersion, ModelVersion, TrainedModel
from lifecycle.spec import DatasetSpec
from tasks.records import find_record, publish_record
from tasks.serving import deployment_id, prepare_snapshot_task, rollout_task, serving_code_version, serving_now_task


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
        LifecycleError: the new server failed (the previous one is restored), or the target kind is
            not supported yet.
    """
    if serving.kind == "docker":
        raise LifecycleError("docker serving target: not implemented yet (issue 7)")
    dep_id = deployment_id(model, index, serving)
    cached = find_record(store, Deployment, dep_id)
    if cached is not None and cached.status == "serving" and serving_now_task(serving, dep_id) is not None:
        return cached
    lineage = deployment_lineage(spec, model, index, store, dep_id)
    snapshot = prepare_snapshot_task(serving, mlflow, model, index, vectors if index else None, lineage)
    server, previous = rollout_task(serving, snapshot)
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
        handle=str(server.pid),
        status="serving",
        previous=previous,
    )
    publish_record(store, record)
    print(f"deployment {dep_id}: {model.model_name} v{model.version} on {serving.endpoint} (PID {server.pid})")
    return record
