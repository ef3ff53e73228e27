"""The deploy flow end to end: MLflow run → snapshot → server process → record; cached, replaced, revived, failed."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prefect import flow

from flows.deploy import STAGE, deploy
from flows.runner import Call
from infra_blocks import MlflowTarget, ServingTarget, VectorStore
from lifecycle.errors import LifecycleError
from lifecycle.records import Deployment, IndexVersion, TrainedModel
from lifecycle.sample import SAMPLE_SPEC
from lifecycle.spec import parse_spec
from tasks import process_serving as srv
from tasks.records import find_record, save_record
from tests.tasks.test_serving import TOKEN, free_port, gone, mlflow_run, model_version, no_stray_servers  # noqa: F401

SPEC = parse_spec({**SAMPLE_SPEC, "name": "tickets", "source": "tickets.csv"})


@pytest.fixture
def targets(tmp_path, lake):
    serving = ServingTarget(port=free_port(), workdir=str(tmp_path / "serving"), api_token=TOKEN, health_timeout_s=30)
    return serving, VectorStore(uri=str(tmp_path / "lancedb"))


def test_deploy_serves_then_is_cached_then_replaced(tmp_path_factory, lake, targets):
    serving, vectors = targets
    mlflow, run_id = mlflow_run(tmp_path_factory)
    save_record(lake, TrainedModel(id="tm1", dataset="tickets", dataset_version="dv-123", run_id=run_id,
                                   model_uri=f"runs:/{run_id}/model", metrics={"accuracy": 0.9},
                                   primary_metric="accuracy", greater_is_better=True))
    v1 = model_version(run_id, "1")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        first = deploy(SPEC, v1, None, lake, mlflow, vectors, serving)
        assert first.status == "serving" and first.endpoint == serving.endpoint and first.previous is None
        assert first.inputs == {"model_version": "mv1"} and first.index_version is None
        assert find_record(lake, Deployment, first.id) == first
        lineage = httpx.get(f"{serving.endpoint}/version", headers=auth).json()
        assert lineage["dataset_version"] == "dv-123" and lineage["model_version"] == "1"
        assert lineage["deployment_id"] == first.id and lineage["run_id"] == run_id
        row = {"account_age_days": 30, "prior_tickets": 4, "response_minutes": 12.5, "sentiment": -0.6,
               "channel": "email", "plan": "pro"}
        answer = httpx.post(f"{serving.endpoint}/invocations", json={"dataframe_records": [row]}, headers=auth)
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 1
        assert httpx.post(f"{serving.endpoint}/search", json={"query": "refund"}, headers=auth).status_code == 503

        again = deploy(SPEC, v1, None, lake, mlflow, vectors, serving)
        assert again == first  # same inputs, server still answering: the stored record, no restart
        assert srv.read_current(serving).pid == int(first.handle)

        second = deploy(SPEC, model_version(run_id, "2"), None, lake, mlflow, vectors, serving)
        assert second.id != first.id and second.previous == first.id
        assert gone(int(first.handle)) and srv.read_current(serving).pid == int(second.handle)
        assert httpx.get(f"{serving.endpoint}/version", headers=auth).json()["model_version"] == "2"

        srv.stop_current(serving, grace_s=5)  # the record exists but nothing answers: deploy again, same id
        revived = deploy(SPEC, model_version(run_id, "2"), None, lake, mlflow, vectors, serving)
        assert revived.id == second.id and revived.handle != second.handle and revived.created_at > second.created_at
        assert httpx.get(f"{serving.endpoint}/health").status_code == 200
    finally:
        srv.stop_current(serving, grace_s=5)
    assert srv.read_current(serving) is None


def test_an_exposed_target_without_a_token_is_refused_before_anything(tmp_path, lake):
    """The row's `require`: nothing is downloaded, rolled out or recorded for an open bind without a token."""
    serving = ServingTarget(host="0.0.0.0", port=free_port(), workdir=str(tmp_path / "serving"))
    mlflow = MlflowTarget(tracking_uri=f"sqlite:///{tmp_path / 'never-opened.db'}")
    model = model_version("run-never-read")
    with pytest.raises(LifecycleError, match="beyond loopback without an api_token"):
        deploy(SPEC, model, None, lake, mlflow, VectorStore(uri=str(tmp_path / "lancedb")), serving)
    assert not (tmp_path / "serving").exists() and not (tmp_path / "never-opened.db").exists()
    assert not list((tmp_path / "lake").rglob("*deployment*"))


def test_a_stored_deployment_stands_only_while_its_server_answers(tmp_path, lake, targets):
    """The row's `reuse`: a `serving` record whose server is gone, or a `failed` one, rolls out again."""
    serving, vectors = targets
    mlflow = MlflowTarget(tracking_uri=f"sqlite:///{tmp_path / 'never-opened.db'}")
    call = Call(SPEC, lake, {"model_version": model_version("run-x"), "index": None}, (mlflow, vectors, serving))
    record_id = STAGE.record_id(call)
    stored = Deployment(id=record_id, dataset="tickets", model_name="tickets", model_version="1", index_version=None,
                        target="process", endpoint=serving.endpoint, handle="1", status="serving")

    @flow
    def stands(record: Deployment) -> bool:  # the reuse check asks the target through a task
        assert STAGE.reuse is not None
        return STAGE.reuse(call, record)

    assert not stands(stored)  # nothing serves the target
    assert not stands(stored.model_copy(update={"status": "failed"}))


def small_index(vectors: VectorStore) -> IndexVersion:
    """A 40-row LanceDB table shaped like the index stage's (id, vector, text, metadata), tagged."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(40, 384)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    table = pa.table({"id": pa.array(range(40), pa.int64()),
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), 384),
                      "text": [f"ticket {i}" for i in range(40)],
                      "category": ["billing", "technical"] * 20})
    tbl = vectors.connect().create_table("tickets", table)
    tbl.tags.create("ds-dv-123", tbl.version)
    return IndexVersion(id="ix1", dataset="tickets", dataset_version="dv-123", embedding_set="es1",
                        uri=vectors.uri, table="tickets", table_version=tbl.version, tag="ds-dv-123",
                        index_type="exact", index_params={"distance_type": "cosine"}, rows=40, k=10,
                        recall_at_k=1.0, p50_ms=1.0, p95_ms=2.0)


def test_deploy_with_an_index_serves_search(tmp_path_factory, lake, targets):
    """The server opens the pinned table version and embeds queries (MiniLM load: ~7 s)."""
    serving, vectors = targets
    mlflow, run_id = mlflow_run(tmp_path_factory)
    index = small_index(vectors)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        record = deploy(SPEC, model_version(run_id), index, lake, mlflow, vectors, serving)
        assert record.index_version == "ix1" and record.inputs == {"model_version": "mv1", "index": "ix1"}
        found = httpx.post(f"{serving.endpoint}/search", headers=auth,
                           json={"query": "refund", "k": 3, "filter": "category = 'billing'"}).json()["results"]
        assert len(found) == 3 and all(r["metadata"] == {"category": "billing"} for r in found)
        lineage = httpx.get(f"{serving.endpoint}/version", headers=auth).json()
        assert lineage["index_version"] == "ix1" and lineage["index_tag"] == "ds-dv-123"
    finally:
        srv.stop_current(serving, grace_s=5)


def _run_with_files(mlflow, model_dir: Path) -> str:
    """Another run on the same tracking store holding the two model files as train logs them."""
    import mlflow as mlflow_lib

    from serving.model import RUN_ARTIFACT_DIR

    mlflow.apply_env()
    with mlflow_lib.start_run(experiment_id=mlflow.experiment_id()) as run:
        mlflow_lib.log_artifacts(str(model_dir), artifact_path=RUN_ARTIFACT_DIR)
    return run.info.run_id


def _broken_model(mlflow, tmp_path):
    """Model version 2: a classifier's booster whose schema claims regression, so its predictions are
    class vectors and the smoke test's "is a number" fails."""
    from lifecycle.features import FeatureSchema
    from lifecycle.spec import Task
    from serving.model import SCHEMA_FILE
    from tests.serving.test_app import write_model_dir

    broken_dir = write_model_dir(tmp_path / "broken")
    schema = FeatureSchema.model_validate_json((broken_dir / SCHEMA_FILE).read_bytes())
    (broken_dir / SCHEMA_FILE).write_text(schema.model_copy(update={"task": Task.regression, "classes": []}
                                                            ).model_dump_json())
    return model_version(_run_with_files(mlflow, broken_dir), "2")


def test_a_failed_process_rollout_is_recorded_and_the_old_server_restored(tmp_path_factory, tmp_path, lake,
                                                                            targets):
    """A model that fails its smoke test fails the flow with the reason, is published as `failed`, and the
    previous deployment is restarted; deploying the good model again is then the stored record."""
    from tasks.serving import deployment_id

    serving, vectors = targets
    mlflow, run_id = mlflow_run(tmp_path_factory)
    broken = _broken_model(mlflow, tmp_path)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        first = deploy(SPEC, model_version(run_id, "1"), None, lake, mlflow, vectors, serving)
        with pytest.raises(LifecycleError, match="smoke test: prediction .* is not a number") as err:
            deploy(SPEC, broken, None, lake, mlflow, vectors, serving)
        assert f"previous deployment {first.id} restored" in str(err.value)
        failed = find_record(lake, Deployment, deployment_id(broken, None, serving))
        assert failed.status == "failed" and "smoke test" in failed.reason and "\n" not in failed.reason
        assert failed.inputs == {"model_version": "mv2"} and failed.handle == ""
        assert httpx.get(f"{serving.endpoint}/version", headers=auth).json()["deployment_id"] == first.id
        assert find_record(lake, Deployment, first.id) == first
        assert deploy(SPEC, model_version(run_id, "1"), None, lake, mlflow, vectors, serving) == first
    finally:
        srv.stop_current(serving, grace_s=5)


@pytest.mark.docker
def test_docker_deploy_records_every_rollout_and_keeps_the_old_container_on_failure(
        tmp_path_factory, tmp_path, lake, docker_base_url):
    """deploy() on a docker target: image + container + record; cached while it answers; a model that
    fails its smoke test fails the flow with the reason, is recorded as failed, and the old one serves on."""
    from tasks import docker_serving
    from tasks.serving import deployment_id
    from tests.fixtures.docker import BASE_IMAGE

    mlflow, run_id = mlflow_run(tmp_path_factory)
    save_record(lake, TrainedModel(id="tm1", dataset="tickets", dataset_version="dv-123", run_id=run_id,
                                   model_uri=f"runs:/{run_id}/model", metrics={"accuracy": 0.9},
                                   primary_metric="accuracy", greater_is_better=True))
    vectors = VectorStore(uri=str(tmp_path / "lancedb"))
    index = small_index(vectors)
    serving = ServingTarget(kind="docker", docker_base_url=docker_base_url, port=free_port(), api_token=TOKEN,
                            workdir=str(tmp_path / "serving"), health_timeout_s=120, base_image=BASE_IMAGE)
    broken = _broken_model(mlflow, tmp_path)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        first = deploy(SPEC, model_version(run_id, "1"), index, lake, mlflow, vectors, serving)
        assert first.status == "serving" and first.target == "docker" and len(first.handle) == 12
        assert first.image_digest.startswith("sha256:") and first.image_size_mb > 300
        lineage = httpx.get(f"{serving.endpoint}/version", headers=auth).json()
        assert lineage["image_digest"] == first.image_digest and lineage["index_version"] == "ix1"
        assert lineage["dataset_version"] == "dv-123" and lineage["deployment_id"] == first.id
        assert httpx.post(f"{serving.endpoint}/search", json={"query": "refund", "k": 2},
                          headers=auth).json()["results"]

        assert deploy(SPEC, model_version(run_id, "1"), index, lake, mlflow, vectors, serving) == first  # cached

        with pytest.raises(LifecycleError, match="smoke test: prediction .* is not a number") as err:
            deploy(SPEC, broken, index, lake, mlflow, vectors, serving)
        assert f"deployment {first.id} keeps serving" in str(err.value)
        failed = find_record(lake, Deployment, deployment_id(broken, index, serving))
        assert failed.status == "failed" and "smoke test" in failed.reason and failed.image_digest
        assert httpx.get(f"{serving.endpoint}/version", headers=auth).json()["deployment_id"] == first.id
        assert find_record(lake, Deployment, first.id).status == "serving"
    finally:
        docker_serving.stop_current(serving, grace_s=2)
