"""Serving, whichever the target kind: the backend registry, deployment ids, snapshots, the Prefect tasks.

Why this shape:
- **One protocol, one registry.** Each target kind has a backend (`ServingBackend` in
  tasks/serving_common.py: `prepare`, `rollout`, `serving_now`, `stop_current`); `BACKENDS` maps
  `ServingTarget.kind` to it, and the deploy flow and the CLI go through `backend_for`. This module
  sits above the backends (tasks/process_serving.py, tasks/docker_serving.py), which share
  tasks/serving_common.py and never import each other; a new kind is one module and one entry here.
- A deployment is a **snapshot folder** `<workdir>/<deployment id>/` holding the model's two files
  (`booster.json`, `feature_schema.json`, downloaded from the MLflow run) and `config.json`. The
  server needs nothing else: a process server runs from the folder, a docker image is built from it,
  and a rollback restarts an older snapshot or keeps the older container.
- The deployment id hashes the served code through the same manifest (`serving.manifest`) that
  fills the serving image and the MLflow model, so a change to any file a server runs (serving or
  the core modules it imports) is a new deployment, never a "cached" old server.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from prefect import task

from infra_blocks import MlflowTarget, ServingTarget, VectorStore
from lifecycle.client_limits import ClientLimits
from lifecycle.errors import LifecycleError
from lifecycle.records import IndexVersion, ModelVersion, stable_hash
from serving.config import IndexRef, ServingConfig
from serving.manifest import DOCKERFILE, code_digest
from serving.model import MODEL_FILES, RUN_ARTIFACT_DIR, SCHEMA_FILE, missing_files
from tasks.docker_serving import DockerBackend
from tasks.policies import retry_unless_user_error
from tasks.process_serving import ProcessBackend
from tasks.serving_common import CONFIG_FILE, PROJECT_ROOT, RunningServer, ServingBackend, ServingImage

BACKENDS: dict[str, ServingBackend] = {"process": ProcessBackend(), "docker": DockerBackend()}


def backend_for(target: ServingTarget) -> ServingBackend:
    """The backend of the target's kind.

    Raises:
        LifecycleError: no backend serves that kind.
    """
    try:
        return BACKENDS[target.kind]
    except KeyError:
        raise LifecycleError(f"serving target kind {target.kind!r} has no backend "
                             f"(known: {', '.join(sorted(BACKENDS))})") from None


def serving_code_version(root: Path = PROJECT_ROOT) -> str:
    """A hash of the code a server runs: every file of `serving.manifest.served_files`."""
    return code_digest(root)


def deployment_id(model: ModelVersion, index: IndexVersion | None, target: ServingTarget,
                  root: Path = PROJECT_ROOT) -> str:
    """Deterministic id: same model, index, target and served code → same deployment.

    A docker target also hashes its base image, daemon and serving/Dockerfile (what its image is made of).
    Client limits are hashed like the body limit, since they are in the server's config (and the docker
    edge's): a changed limit is a new deployment, never a "cached" server with the old bounds. Workers and
    limits count only when they differ from the defaults: a default target's id is the formula it had before.
    """
    docker = ((target.base_image, target.docker_base_url, (root / DOCKERFILE).read_text())
              if target.kind == "docker" else ())
    workers = (target.workers,) if target.workers != 1 else ()
    limits = (target.limits.model_dump(),) if target.limits != ClientLimits() else ()
    return stable_hash(model.id, index.id if index else None, target.kind, target.host, target.port,
                       target.max_body_bytes, serving_code_version(root), *docker, *workers, *limits)


def serving_now(target: ServingTarget, deployment: str) -> RunningServer | None:
    """The live server of the target if it serves `deployment` and answers (token checked), else None."""
    return backend_for(target).serving_now(target, deployment)


def stop_current(target: ServingTarget, grace_s: float = 10.0) -> RunningServer | None:
    """Stop what the target serves (process group, or containers and edge); returns what was serving."""
    return backend_for(target).stop_current(target, grace_s)


# --- snapshot ------------------------------------------------------------------------------------


def _artifact_paths(client: Any, run_id: str) -> dict[str, str]:
    """Where the run holds booster.json / feature_schema.json: `lifecycle/` (as train logs them), else the root."""
    found: dict[str, str] = {}
    for folder in (RUN_ARTIFACT_DIR, None):
        for entry in client.list_artifacts(run_id, folder):
            name = entry.path.rsplit("/", 1)[-1]
            if not entry.is_dir and name in (SCHEMA_FILE, *MODEL_FILES.values()):
                found.setdefault(name, entry.path)
    missing = missing_files(found)
    if missing:
        raise LifecycleError(f"MLflow run {run_id}: artifact(s) {', '.join(missing)} not found (logged by train)")
    return found


def download_model_files(mlflow: MlflowTarget, run_id: str, dest: Path) -> Path:
    """Copy the run's booster.json and feature_schema.json into `dest` (nothing else is needed)."""
    import mlflow as mlflow_lib

    client = mlflow.client()
    dest.mkdir(parents=True, exist_ok=True)
    for name, artifact_path in _artifact_paths(client, run_id).items():
        local = mlflow_lib.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                        dst_path=str(dest / ".download"),
                                                        tracking_uri=mlflow.tracking_uri)
        os.replace(local, dest / name)
    shutil.rmtree(dest / ".download", ignore_errors=True)
    return dest


def prepare_snapshot(target: ServingTarget, mlflow: MlflowTarget, model: ModelVersion, index: IndexVersion | None,
                     vectors: VectorStore | None, lineage: dict[str, str | None]) -> Path:
    """Write `<workdir>/<deployment id>/` with the model files and config.json; returns the folder."""
    folder = Path(target.workdir).resolve() / str(lineage["deployment_id"])
    if missing_files([n for n in (SCHEMA_FILE, *MODEL_FILES.values()) if (folder / n).exists()]):
        download_model_files(mlflow, model.run_id, folder)
    ref = None
    if index is not None:
        opts = vectors.lance_storage_options() if vectors is not None else {}
        ref = IndexRef(uri=index.uri or (vectors.uri if vectors else ""), table=index.table, tag=index.tag,
                       version=index.table_version, storage_options=opts,
                       distance_type=index.index_params.get("distance_type", "cosine"),
                       query_params=index.index_params.get("query") or {},
                       max_chars=int(index.index_params.get("max_chars", 2000)))
    config = ServingConfig(model_dir=str(folder), lineage=lineage, index=ref, api_token=target.api_token,
                           max_body_bytes=target.max_body_bytes, host=target.host, port=target.port,
                           workers=target.workers, limits=target.limits)
    config.write(folder / CONFIG_FILE)
    return folder


def check_exposure(target: ServingTarget) -> None:
    """An endpoint reachable beyond this machine must require a token (the local profile binds 127.0.0.1).

    Raises:
        LifecycleError: naming the bind address and the missing `api_token`.
    """
    loopback = target.host in ("127.0.0.1", "localhost", "::1") or target.host.startswith("127.")
    if not loopback and target.api_token is None:
        raise LifecycleError(f"serving target binds {target.host}:{target.port} beyond loopback without an api_token; "
                             "set the block's api_token (LIFECYCLE_API_TOKEN in the prod profile)")


# --- Prefect tasks -------------------------------------------------------------------------------


@task(name="prepare-serving-snapshot", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error,
      tags=["lifecycle", "deploy"])
def prepare_snapshot_task(target: ServingTarget, mlflow: MlflowTarget, model: ModelVersion,
                          index: IndexVersion | None, vectors: VectorStore | None,
                          lineage: dict[str, str | None]) -> Path:
    """Prefect wrapper: retries cover a flaky tracking server; a missing artifact fails at once."""
    return prepare_snapshot(target, mlflow, model, index, vectors, lineage)


@task(name="prepare-serving-image", tags=["lifecycle", "deploy"])
def prepare_image_task(target: ServingTarget, snapshot: Path) -> ServingImage | None:
    """Prefect wrapper: what the backend builds before a rollout (docker: the image; process: nothing)."""
    return backend_for(target).prepare(target, snapshot)


@task(name="rollout", tags=["lifecycle", "deploy"])
def rollout_task(target: ServingTarget, snapshot: Path,
                 image: ServingImage | None = None) -> tuple[RunningServer, str | None]:
    """Prefect wrapper, no retries: a failed rollout has already restored (or kept) the previous server."""
    return backend_for(target).rollout(target, snapshot, image)


@task(name="current-deployment", tags=["lifecycle", "deploy"])
def serving_now_task(target: ServingTarget, deployment: str) -> RunningServer | None:
    """Prefect wrapper: is this deployment already up (then the stored record stands)?"""
    return serving_now(target, deployment)
