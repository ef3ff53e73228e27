"""Train flow: a validated dataset version (plus optional text embeddings) → a model logged to MLflow."""

from __future__ import annotations

import sys

from prefect import flow

import lifecycle.features
from infra_blocks import DaskCompute, MlflowTarget, ObjectStore
from lifecycle.errors import LifecycleError
from lifecycle.records import DatasetVersion, EmbeddingSet, TrainedModel, ValidationReport, code_version
from lifecycle.spec import DatasetSpec
from tasks.records import find_record, publish_record
from tasks.validation import require_passed


def train_code_version() -> str:
    """Everything that shapes the model and what is logged with it."""
    import serving.pyfunc
    import tasks.plots
    import tasks.train_data
    import tasks.training

    return code_version(tasks.training, tasks.train_data, tasks.plots, serving.pyfunc, lifecycle.features,
                        sys.modules[__name__])


@flow(name="train", log_prints=True)
def train(spec: DatasetSpec, dataset: DatasetVersion, report: ValidationReport, store: ObjectStore,
          compute: DaskCompute, mlflow: MlflowTarget, embeddings: EmbeddingSet | None = None) -> TrainedModel:
    """Train once per (dataset version, embeddings, train config, code); a cached model is returned as is.

    Raises:
        QuarantinedError: the dataset version has no passing validation report.
        LifecycleError: one label class, embeddings requested but not given, or an unknown metric.
    """
    from tasks.training import train_task, trained_model_id

    require_passed(report, dataset)
    if embeddings is not None and embeddings.dataset_version != dataset.id:
        raise LifecycleError(f"embedding set {embeddings.id} is for dataset version {embeddings.dataset_version}, "
                             f"not {dataset.id}")
    version = train_code_version()
    record_id = trained_model_id(spec, dataset, embeddings, version)
    cached = find_record(store, TrainedModel, record_id)
    if cached is not None:
        return cached
    record = train_task(spec, dataset, report, store, compute, mlflow, record_id, version, embeddings)
    publish_record(store, record)
    return record
