"""Entry points of the deployments: parts of the stage table started from record ids and a profile name.

An event trigger, the UI's form or `run_deployment` can pass only small typed values, never blocks or
records. So each entry point takes the ids of its input records (what the stage events carry) and the
name of a profile; `_enter` loads the records from the object store, the blocks from the Prefect API
(`<profile>-<role>`) and the spec the dataset version was ingested with (tasks/specs.py), then runs
its part of the table (flows/stages.py) exactly as the lifecycle does. The flows below are one-line
shims because prefect.yaml entrypoints and `enforce_parameter_schema` need real signatures; their
parameters are the table's (`entry_params`), and types carry patterns, so the server refuses a
malformed id or name before a run exists.

The event chain (prefect.yaml triggers, `flows.stages.SEGMENTS`):
    lifecycle.dataset.landed    → landed (flows/watch.py; starts ingest-validate once per object)
    lifecycle.dataset.validated → build (embed → index, train → register)
    lifecycle.model.promoted    → stage-deploy
Chain runs tag their work `lifecycle-chain`; the triggers match only events related to that tag, so
the `lifecycle` deployment and manual stage runs (which do their own next steps, or none) start nothing.
Every entry point holds its dataset's lock while it works (tasks/orchestration.py): two runs for one
dataset never overlap, and the second finds the first one's records instead of redoing the work.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import TypeVar

from prefect import flow, tags

from flows.lifecycle import LifecycleResult, run_lifecycle
from flows.params import DatasetName, ObjectUri, ProfileName, RecordId
from flows.stages import StagesRun, given_records, run_stages, segment
from flows.subflows import without_subflow_heartbeat
from lifecycle.records import (
    DatasetVersion,
    Deployment,
    EmbeddingSet,
    IndexVersion,
    ModelVersion,
    Record,
    TrainedModel,
    ValidationReport,
)
from lifecycle.spec import DatasetSpec
from tasks.orchestration import CHAIN_TAG, dataset_lock, targets_for
from tasks.specs import registered_spec, save_spec_version, spec_for

R = TypeVar("R", bound=Record)


def _enter(names: tuple[str, ...] | None, profile: str | None, *, spec: DatasetSpec | None = None,
           dataset: str | None = None, source: str | None = None, chain: bool = False,
           ids: dict[str, str | None] | None = None) -> StagesRun | LifecycleResult:
    """The one entry path: blocks of the profile, the spec, the records passed by id; then, holding the
    dataset's lock, the named stages (None: the whole lifecycle).

    The spec is, in this order: the one given (the lifecycle's form), the dataset's registered spec
    with `source` (ingest of a landed object), or the one the passed records' dataset version was
    ingested with.
    """
    _, targets = targets_for(profile)
    store = targets.store
    given = given_records(store, ids or {})
    if spec is None and dataset is not None:
        spec = registered_spec(store, dataset, source=source)
    if spec is not None:
        save_spec_version(store, spec)
    else:
        version = given["dataset"]
        assert isinstance(version, DatasetVersion)
        spec = spec_for(store, version)
    with ExitStack() as stack:
        if chain:
            stack.enter_context(tags(CHAIN_TAG))
        stack.enter_context(dataset_lock(spec.name))
        stack.enter_context(without_subflow_heartbeat())
        if names is None:
            return run_lifecycle(spec, targets)
        return run_stages(spec, targets, names, given)


def _record(cls: type[R], run: StagesRun | LifecycleResult) -> R:
    assert isinstance(run, StagesRun)
    return run.get(cls)


def _stage(cls: type[R], name: str, profile: str | None, **ids: str | None) -> R:
    return _record(cls, _enter((name,), profile, ids=ids))


def _segment(cls: type[R], deployment: str, profile: str | None, **kwargs: str | None) -> R:
    part = segment(deployment)
    dataset, source = kwargs.pop("dataset", None), kwargs.pop("source", None)
    return _record(cls, _enter(part.stages, profile, dataset=dataset, source=source, chain=part.chain, ids=kwargs))


@flow(name="lifecycle", log_prints=True)
def lifecycle_deployment(spec: DatasetSpec, profile: ProfileName | None = None) -> LifecycleResult:
    """The whole lifecycle for one dataset spec (the nightly schedule and the UI's form start this)."""
    result = _enter(None, profile, spec=spec)
    assert isinstance(result, LifecycleResult)
    return result


@flow(name="ingest-validate", log_prints=True)
def ingest_validate(dataset: DatasetName, uri: ObjectUri, profile: ProfileName | None = None) -> ValidationReport:
    """Ingest a landed object with the dataset's registered spec, then validate the new version."""
    return _segment(ValidationReport, "ingest-validate", profile, dataset=dataset, source=uri)


@flow(name="build", log_prints=True)
def build(validation: RecordId, profile: ProfileName | None = None) -> ModelVersion:
    """After a passing validation: embed → index and train → register (register announces a promotion)."""
    return _segment(ModelVersion, "build", profile, validation=validation)


@flow(name="stage-ingest", log_prints=True)
def ingest_entry(dataset: DatasetName, source: str | None = None, profile: ProfileName | None = None) -> DatasetVersion:
    """Ingest with the dataset's registered spec (from `source` when given, else the spec's own)."""
    return _record(DatasetVersion, _enter(("ingest",), profile, dataset=dataset, source=source))


@flow(name="stage-validate", log_prints=True)
def validate_entry(dataset_version: RecordId, profile: ProfileName | None = None) -> ValidationReport:
    return _stage(ValidationReport, "validate", profile, dataset_version=dataset_version)


@flow(name="stage-embed", log_prints=True)
def embed_entry(validation: RecordId, profile: ProfileName | None = None) -> EmbeddingSet:
    return _stage(EmbeddingSet, "embed", profile, validation=validation)


@flow(name="stage-index", log_prints=True)
def index_entry(embeddings: RecordId, profile: ProfileName | None = None) -> IndexVersion:
    return _stage(IndexVersion, "index", profile, embeddings=embeddings)


@flow(name="stage-train", log_prints=True)
def train_entry(validation: RecordId, embeddings: RecordId | None = None,
                profile: ProfileName | None = None) -> TrainedModel:
    """Train on a validated version; with `train.use_text_embeddings` the version's embedding set is used
    (the one named, or the one the embed stage made for this version)."""
    return _stage(TrainedModel, "train", profile, validation=validation, embeddings=embeddings)


@flow(name="stage-register", log_prints=True)
def register_entry(trained: RecordId, profile: ProfileName | None = None) -> ModelVersion:
    return _stage(ModelVersion, "register", profile, trained=trained)


@flow(name="stage-deploy", log_prints=True)
def deploy_entry(model_version: RecordId, index: RecordId | None = None,
                 profile: ProfileName | None = None) -> Deployment:
    """Serve a model version with the dataset's index (the one named, else the dataset's latest)."""
    return _stage(Deployment, "deploy", profile, model_version=model_version, index=index)

