"""The whole lifecycle: ingest → validate → embed → (index | train → register) → deploy.

This flow only wires stages. Each stage is its own flow (runnable alone, its own deployment) that
returns a record; a stage whose inputs are unchanged returns its stored record at once, so a re-run on
unchanged data is nearly free. The summary marks such stages `cached`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from prefect import flow
from pydantic import BaseModel, Field

from flows.deploy import deploy
from flows.embed import embed
from flows.index import index
from flows.ingest import ingest
from flows.register import register
from flows.subflows import without_subflow_heartbeat
from flows.train import train
from flows.validate import validate
from lifecycle import progress
from infra_blocks.profiles import Targets, load_targets
from lifecycle.records import (
    DatasetVersion,
    Deployment,
    EmbeddingSet,
    IndexVersion,
    ModelVersion,
    Record,
    TrainedModel,
    ValidationReport,
    utcnow,
)
from lifecycle.spec import DatasetSpec
from tasks.promotion import audited_champion

T = TypeVar("T", bound=Record)


class StageResult(BaseModel):
    stage: str
    status: str = Field(description="ran | cached | skipped")
    seconds: float
    record_id: str | None = None


class LifecycleResult(BaseModel):
    """Everything one lifecycle run produced, for the CLI summary, events and benchmarks."""

    dataset: DatasetVersion
    validation: ValidationReport
    embeddings: EmbeddingSet | None = None
    index: IndexVersion | None = None
    trained: TrainedModel
    model: ModelVersion
    deployment: Deployment | None = None
    stages: list[StageResult]
    seconds: float


def _run_stage(name: str, started_at: datetime, results: list[StageResult], fn: Callable[..., T], *args: Any,
               **kwargs: Any) -> T:
    """Run one stage flow, timing it and noting whether it did work or reused its record."""
    progress.stage_started(name)
    t0 = time.perf_counter()
    with without_subflow_heartbeat():
        record = fn(*args, **kwargs)
    seconds = time.perf_counter() - t0
    status = "cached" if record.created_at < started_at else "ran"
    results.append(StageResult(stage=name, status=status, seconds=round(seconds, 3), record_id=record.id))
    progress.stage_finished(name, status, seconds)
    return record


def _skip(name: str, results: list[StageResult], why: str) -> None:
    progress.stage_started(name)
    results.append(StageResult(stage=name, status=f"skipped ({why})", seconds=0.0))
    progress.stage_finished(name, "skipped", 0.0)


@flow(name="lifecycle", log_prints=True)
def lifecycle(spec: DatasetSpec, profile: str = "local") -> LifecycleResult:
    """Run every stage for one dataset spec against the blocks of a profile."""
    return run_lifecycle(spec, load_targets(profile))


def run_lifecycle(spec: DatasetSpec, targets: Targets) -> LifecycleResult:
    """The DAG itself, given the blocks (the CLI passes blocks it built; deployments load them)."""
    t0 = time.perf_counter()
    started_at = utcnow()
    results: list[StageResult] = []
    store = targets.store

    dataset = _run_stage("ingest", started_at, results, ingest, spec, store)
    report = _run_stage("validate", started_at, results, validate, spec, dataset, store)
    embeddings = index_version = None
    if spec.text_column:
        embeddings = _run_stage("embed", started_at, results, embed, spec, dataset, report, store, targets.compute)
        index_version = _run_stage("index", started_at, results, index, spec, embeddings, store, targets.vectors)
    else:
        _skip("embed", results, "no text column")
        _skip("index", results, "no text column")
    features = embeddings if spec.train.use_text_embeddings else None
    trained = _run_stage("train", started_at, results, train, spec, dataset, report, store, targets.compute,
                         targets.mlflow, features)
    model = _run_stage("register", started_at, results, register, spec, trained, store, targets.mlflow)
    # The champion by the audit chain: this run's model when it was promoted, else whatever register,
    # `lifecycle promote` or `lifecycle rollback` last moved the alias to.
    champion = audited_champion(store, spec.name, targets.mlflow.model_name(spec.name))
    deployment = None
    if champion is None:
        _skip("deploy", results, "no champion")
    else:
        deployment = _run_stage("deploy", started_at, results, deploy, spec, champion, index_version, store,
                                targets.mlflow, targets.vectors, targets.serving)
    return LifecycleResult(
        dataset=dataset, validation=report, embeddings=embeddings, index=index_version, trained=trained,
        model=model, deployment=deployment, stages=results, seconds=round(time.perf_counter() - t0, 3),
    )


@flow(name="lifecycle-local", log_prints=True)
def lifecycle_with_targets(spec: DatasetSpec, targets: Targets) -> LifecycleResult:
    """The lifecycle with blocks given in-process (the CLI's `run`, tests)."""
    return run_lifecycle(spec, targets)
