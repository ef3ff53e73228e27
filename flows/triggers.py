"""Entry points of the deployments: stages started from record ids and a profile name.

An event trigger, the UI's form or `run_deployment` can pass only small typed values, never blocks or
records. So each entry point takes the ids of its input records (what the stage events carry) and the
name of a profile, loads the records from the object store, the blocks from the Prefect API
(`<profile>-<role>`) and the spec the dataset version was ingested with (tasks/specs.py), then calls
the same stage flows that `flows/lifecycle.py` wires. Parameter types carry patterns, so with
`enforce_parameter_schema` the server refuses a malformed id or name before a run exists.

The event chain (prefect.yaml triggers):
    lifecycle.dataset.landed    → landed (flows/watch.py; starts ingest-validate once per object)
    lifecycle.dataset.validated → build (embed → index, train → register)
    lifecycle.model.promoted    → stage-deploy
Chain runs tag their work `lifecycle-chain`; the triggers match only events related to that tag, so
the `lifecycle` deployment and manual stage runs (which do their own next steps, or none) start nothing.
Every entry point holds its dataset's lock while it works (tasks/orchestration.py): two runs for one
dataset never overlap, and the second finds the first one's records instead of redoing the work.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect import flow, tags

from flows.deploy import deploy
from flows.embed import embed
from flows.index import index
from flows.ingest import ingest
from flows.lifecycle import LifecycleResult, run_lifecycle
from flows.params import DatasetName, ObjectUri, ProfileName, RecordId
from flows.register import register
from flows.subflows import without_subflow_heartbeat
from flows.train import train
from flows.validate import validate
from lifecycle.errors import LifecycleError
from lifecycle.records import (DatasetVersion, Deployment, EmbeddingSet, IndexVersion, ModelVersion, TrainedModel,
                               ValidationReport)
from lifecycle.spec import DatasetSpec
from tasks.orchestration import CHAIN_TAG, dataset_lock, targets_for
from tasks.records import find_record, latest_record, load_record
from tasks.specs import registered_spec, save_spec_version, spec_for

def _dataset_of(store, record_id: str) -> DatasetVersion:
    return load_record(store, DatasetVersion, record_id)


@contextmanager
def _stage_work(dataset: str) -> Iterator[None]:
    """Where an entry flow calls its stages: holding the dataset's lock (no overlapping work on one
    dataset), the stage subflows sending no heartbeat of their own (this flow run keeps its)."""
    with dataset_lock(dataset), without_subflow_heartbeat():
        yield


@flow(name="lifecycle", log_prints=True)
def lifecycle_deployment(spec: DatasetSpec, profile: ProfileName | None = None) -> LifecycleResult:
    """The whole lifecycle for one dataset spec (the nightly schedule and the UI's form start this)."""
    _, targets = targets_for(profile)
    save_spec_version(targets.store, spec)
    with _stage_work(spec.name):
        return run_lifecycle(spec, targets)


@flow(name="ingest-validate", log_prints=True)
def ingest_validate(dataset: DatasetName, uri: ObjectUri, profile: ProfileName | None = None) -> ValidationReport:
    """Ingest a landed object with the dataset's registered spec, then validate the new version."""
    _, targets = targets_for(profile)
    store = targets.store
    spec = registered_spec(store, dataset, source=uri)
    save_spec_version(store, spec)
    with tags(CHAIN_TAG), _stage_work(dataset):
        version = ingest(spec, store)
        return validate(spec, version, store)


@flow(name="build", log_prints=True)
def build(validation: RecordId, profile: ProfileName | None = None) -> ModelVersion:
    """After a passing validation: embed → index and train → register (register announces a promotion)."""
    _, targets = targets_for(profile)
    store = targets.store
    report = load_record(store, ValidationReport, validation)
    version = _dataset_of(store, report.dataset_version)
    spec = spec_for(store, version)
    with tags(CHAIN_TAG), _stage_work(spec.name):
        embeddings = None
        if spec.text_column:
            embeddings = embed(spec, version, report, store, targets.compute)
            index(spec, embeddings, store, targets.vectors)
        features = embeddings if spec.train.use_text_embeddings else None
        trained = train(spec, version, report, store, targets.compute, targets.mlflow, features)
        return register(spec, trained, store, targets.mlflow)


@flow(name="stage-ingest", log_prints=True)
def ingest_entry(dataset: DatasetName, source: str | None = None, profile: ProfileName | None = None) -> DatasetVersion:
    """Ingest with the dataset's registered spec (from `source` when given, else the spec's own)."""
    _, targets = targets_for(profile)
    spec = registered_spec(targets.store, dataset, source=source)
    save_spec_version(targets.store, spec)
    with _stage_work(dataset):
        return ingest(spec, targets.store)


@flow(name="stage-validate", log_prints=True)
def validate_entry(dataset_version: RecordId, profile: ProfileName | None = None) -> ValidationReport:
    _, targets = targets_for(profile)
    version = _dataset_of(targets.store, dataset_version)
    with _stage_work(version.dataset):
        return validate(spec_for(targets.store, version), version, targets.store)


@flow(name="stage-embed", log_prints=True)
def embed_entry(validation: RecordId, profile: ProfileName | None = None) -> EmbeddingSet:
    _, targets = targets_for(profile)
    report = load_record(targets.store, ValidationReport, validation)
    version = _dataset_of(targets.store, report.dataset_version)
    with _stage_work(version.dataset):
        return embed(spec_for(targets.store, version), version, report, targets.store, targets.compute)


@flow(name="stage-index", log_prints=True)
def index_entry(embeddings: RecordId, profile: ProfileName | None = None) -> IndexVersion:
    _, targets = targets_for(profile)
    emb = load_record(targets.store, EmbeddingSet, embeddings)
    version = _dataset_of(targets.store, emb.dataset_version)
    with _stage_work(version.dataset):
        return index(spec_for(targets.store, version), emb, targets.store, targets.vectors)


@flow(name="stage-train", log_prints=True)
def train_entry(validation: RecordId, embeddings: RecordId | None = None,
                profile: ProfileName | None = None) -> TrainedModel:
    """Train on a validated version; with `train.use_text_embeddings` the version's embedding set is used
    (the one named, or the one the embed stage made for this version)."""
    from tasks.embeddings import embedding_set_id

    _, targets = targets_for(profile)
    store = targets.store
    report = load_record(store, ValidationReport, validation)
    version = _dataset_of(store, report.dataset_version)
    spec = spec_for(store, version)
    emb = None
    if embeddings:
        emb = load_record(store, EmbeddingSet, embeddings)
    elif spec.train.use_text_embeddings:
        emb = find_record(store, EmbeddingSet, embedding_set_id(spec, version))
        if emb is None:
            raise LifecycleError(f"dataset version {version.id}: no embedding set yet; run stage-embed first")
    with _stage_work(version.dataset):
        return train(spec, version, report, store, targets.compute, targets.mlflow, emb)


@flow(name="stage-register", log_prints=True)
def register_entry(trained: RecordId, profile: ProfileName | None = None) -> ModelVersion:
    _, targets = targets_for(profile)
    model = load_record(targets.store, TrainedModel, trained)
    version = _dataset_of(targets.store, model.dataset_version)
    with _stage_work(version.dataset):
        return register(spec_for(targets.store, version), model, targets.store, targets.mlflow)


@flow(name="stage-deploy", log_prints=True)
def deploy_entry(model_version: RecordId, index: RecordId | None = None,
                 profile: ProfileName | None = None) -> Deployment:
    """Serve a model version with the dataset's index (the one named, else the dataset's latest)."""
    _, targets = targets_for(profile)
    store = targets.store
    model = load_record(store, ModelVersion, model_version)
    trained = load_record(store, TrainedModel, model.trained_model)
    version = _dataset_of(store, trained.dataset_version)
    spec = spec_for(store, version)
    if index:
        index_version = load_record(store, IndexVersion, index)
    else:
        index_version = latest_record(store, IndexVersion, spec.name) if spec.text_column else None
    with _stage_work(spec.name):
        return deploy(spec, model, index_version, store, targets.mlflow, targets.vectors, targets.serving)
