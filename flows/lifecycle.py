"""The whole lifecycle: ingest → validate → embed → (index | train → register) → deploy.

This flow only runs the table of stages (flows/stages.py) in its order. Each stage is its own flow
(runnable alone, its own deployment) that returns a record; a stage whose inputs are unchanged returns
its stored record at once, so a re-run on unchanged data is nearly free. The summary marks such
stages `cached`. The deployed flow named `lifecycle` (the nightly schedule, the UI) is in
flows/triggers.py: it loads the blocks of a profile and runs the same `run_lifecycle`.
"""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel

from flows.stages import StageResult, run_stages
from infra_blocks.profiles import Targets
from lifecycle.records import (
    DatasetVersion,
    Deployment,
    EmbeddingSet,
    IndexVersion,
    ModelVersion,
    TrainedModel,
    ValidationReport,
)
from lifecycle.spec import DatasetSpec

__all__ = ["LifecycleResult", "StageResult", "lifecycle_with_targets", "run_lifecycle"]


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


def run_lifecycle(spec: DatasetSpec, targets: Targets) -> LifecycleResult:
    """The DAG itself, given the blocks (the CLI passes blocks it built; deployments load them)."""
    run = run_stages(spec, targets)
    return LifecycleResult(
        dataset=run.get(DatasetVersion), validation=run.get(ValidationReport), embeddings=run.maybe(EmbeddingSet),
        index=run.maybe(IndexVersion), trained=run.get(TrainedModel), model=run.get(ModelVersion),
        deployment=run.maybe(Deployment), stages=run.results, seconds=run.seconds,
    )


@flow(name="lifecycle-local", log_prints=True)
def lifecycle_with_targets(spec: DatasetSpec, targets: Targets) -> LifecycleResult:
    """The lifecycle with blocks given in-process (the CLI's `run`, tests)."""
    return run_lifecycle(spec, targets)
