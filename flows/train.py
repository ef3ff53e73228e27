"""Train flow: a validated dataset version (plus optional text embeddings) → a model logged to MLflow."""

from __future__ import annotations

import sys

from prefect import flow

import lifecycle.features
from flows.runner import Call, Input, Stage, produce
from infra_blocks import DaskCompute, MlflowTarget, ObjectStore
from lifecycle.errors import LifecycleError
from lifecycle.records import DatasetVersion, EmbeddingSet, Record, TrainedModel, ValidationReport, code_version
from lifecycle.spec import DatasetSpec
from tasks.validation import require_passed


def train_code_version() -> str:
    """Everything that shapes the model and what is logged with it."""
    import serving.pyfunc
    import tasks.baseline
    import tasks.plots
    import tasks.train_data
    import tasks.train_layout
    import tasks.train_metrics
    import tasks.training

    return code_version(tasks.training, tasks.train_data, tasks.train_layout, tasks.train_metrics, tasks.baseline,
                        tasks.plots, serving.pyfunc, lifecycle.features, sys.modules[__name__])


@flow(name="train", log_prints=True)
def train(spec: DatasetSpec, dataset: DatasetVersion, report: ValidationReport, store: ObjectStore,
          compute: DaskCompute, mlflow: MlflowTarget, embeddings: EmbeddingSet | None = None) -> TrainedModel:
    """Train once per (dataset version, embeddings, train config, code); a cached model is returned as is.

    Raises:
        QuarantinedError: the dataset version has no passing validation report.
        LifecycleError: one label class, embeddings requested but not given, or an unknown metric.
    """
    return produce(STAGE, Call(spec, store, {"dataset": dataset, "validation": report, "embeddings": embeddings},
                               (compute, mlflow)))


def _require(call: Call) -> None:
    dataset, embeddings = call.get(DatasetVersion), call.maybe(EmbeddingSet)
    require_passed(call.get(ValidationReport), dataset)
    if embeddings is not None and embeddings.dataset_version != dataset.id:
        raise LifecycleError(f"embedding set {embeddings.id} is for dataset version {embeddings.dataset_version}, "
                             f"not {dataset.id}")


def _record_id(call: Call) -> str:
    from tasks.training import trained_model_id

    return trained_model_id(call.spec, call.get(DatasetVersion), call.maybe(EmbeddingSet), train_code_version())


def _work(call: Call, record_id: str | None) -> TrainedModel:
    """The train task (its workers' memory is watched inside it: running out ends it in one line, never a hang)."""
    from tasks.training import train_task

    assert record_id is not None
    return train_task(call.spec, call.get(DatasetVersion), call.get(ValidationReport), call.store,
                      call.block(DaskCompute), call.block(MlflowTarget), record_id, train_code_version(),
                      call.maybe(EmbeddingSet))


def _embeddings_of_the_version(call: Call) -> Record | None:
    """Started alone without an embedding set: the one the embed stage made for this version."""
    from tasks.embeddings import embedding_set_id
    from tasks.records import find_record

    dataset = call.get(DatasetVersion)
    found = find_record(call.store, EmbeddingSet, embedding_set_id(call.spec, dataset))
    if found is None:
        raise LifecycleError(f"dataset version {dataset.id}: no embedding set yet; run stage-embed first")
    return found


STAGE = Stage(
    name="train", record=TrainedModel,
    inputs=(Input("dataset", "dataset"), Input("validation", "report"),
            Input("embeddings", "embeddings", optional=True, wanted=lambda spec: spec.train.use_text_embeddings,
                  find=_embeddings_of_the_version)),
    blocks=("compute", "mlflow"), flow=train, work=_work, record_id=_record_id, require=_require,
)
