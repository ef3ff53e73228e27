"""Embed flow: a validated dataset version → an EmbeddingSet (vectors of its text column)."""

from __future__ import annotations

from prefect import flow

from flows.runner import Call, Input, Stage, produce
from infra_blocks import DaskCompute, ObjectStore
from lifecycle.records import DatasetVersion, EmbeddingSet, ValidationReport
from lifecycle.spec import DatasetSpec
from tasks.embeddings import embed_task, embedding_set_id
from tasks.records import latest_record
from tasks.validation import require_passed


@flow(name="embed")
def embed(spec: DatasetSpec, dataset: DatasetVersion, report: ValidationReport, store: ObjectStore,
          compute: DaskCompute) -> EmbeddingSet:
    """Embed the text column on the compute target; unchanged inputs return the stored record.

    An append version extends the previous embedding set: only the added files' rows are encoded and
    the earlier parts are referenced. Otherwise rows of the previous set whose id and text are
    unchanged are copied, not re-encoded.
    """
    return produce(STAGE, Call(spec, store, {"dataset": dataset, "validation": report}, (compute,)))


def _work(call: Call, record_id: str | None) -> EmbeddingSet:
    """The embed task, its workers' memory watched: running out ends it in one line naming the limit."""
    from tasks.worker_memory import compute_memory_watched

    previous = latest_record(call.store, EmbeddingSet, call.spec.name)
    compute = call.block(DaskCompute)
    with compute_memory_watched(compute, "embed"):
        return embed_task(call.store, call.spec, call.get(DatasetVersion), compute, previous,
                          inputs={"validation": call.get(ValidationReport).id})


def no_text_column(spec: DatasetSpec) -> str | None:
    return None if spec.text_column else "no text column"


STAGE = Stage(
    name="embed", record=EmbeddingSet, inputs=(Input("dataset", "dataset"), Input("validation", "report")),
    blocks=("compute",), flow=embed, work=_work,
    record_id=lambda call: embedding_set_id(call.spec, call.get(DatasetVersion)),
    require=lambda call: require_passed(call.get(ValidationReport), call.get(DatasetVersion)),
    skip=no_text_column,
)
