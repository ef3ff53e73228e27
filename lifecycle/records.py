"""Stage records: the small, persisted facts that chain the lifecycle together.

Every stage returns one record. It is stored as JSON in the object store under
`records/<kind>/<id>.json` and announced as a Prefect event, so any stage can be started from a
record alone and lineage is simply the chain of `inputs`. Record ids are content-derived: a stage
whose record id already exists has nothing new to do (that is how unchanged stages are skipped).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from datetime import datetime, timezone
from types import ModuleType
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def stable_hash(*parts: Any, length: int = 16) -> str:
    """Hash JSON-able parts into a short hex id; the same inputs always give the same id."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


_SOURCE_HASHES: dict[str, str] = {}


def _source_hash(module: ModuleType) -> str:
    # Hashed once per process: the code that runs is the code that was imported, even if the file
    # on disk changes while a long-lived worker or server process is up.
    if module.__name__ not in _SOURCE_HASHES:
        _SOURCE_HASHES[module.__name__] = stable_hash(inspect.getsource(module), length=32)
    return _SOURCE_HASHES[module.__name__]


def code_version(*modules: ModuleType) -> str:
    """A hash of the source of the modules a stage runs, so a code change invalidates its cache."""
    return stable_hash(*(_source_hash(m) for m in modules), length=12)


IndexType = Literal["exact", "ivf_flat", "ivf_pq", "ivf_hnsw_sq"]

class Record(BaseModel):
    """Fields every stage record carries."""

    model_config = ConfigDict(extra="forbid")
    kind: ClassVar[str] = "record"
    event: ClassVar[str | None] = None

    id: str = Field(..., description="Content-derived id; equal ids mean equal work.")
    dataset: str = Field(..., description="Dataset name the record belongs to.")
    created_at: datetime = Field(default_factory=utcnow)
    code_version: str = ""
    inputs: dict[str, str] = Field(default_factory=dict, description="Lineage: input kind -> record id.")

    @property
    def key(self) -> str:
        return record_key(type(self), self.id)

    def event_payload(self) -> dict[str, Any]:
        """Resource labels for the Prefect event announcing this record."""
        labels = {f"lifecycle.input.{k}": v for k, v in self.inputs.items()}
        return {
            "prefect.resource.id": f"lifecycle.{self.kind}.{self.id}",
            "prefect.resource.name": f"{self.dataset}/{self.kind}/{self.id}",
            "lifecycle.dataset": self.dataset,
            "lifecycle.record": self.key,
            **labels,
        }


class DatasetVersion(Record):
    """A version of a dataset's Delta Lake table: what the table holds at that version and what its
    commit added. The id is the table's content hash, so the same content has the same id."""

    kind: ClassVar[str] = "dataset"
    event: ClassVar[str | None] = "lifecycle.dataset.ingested"
    source: str = Field(..., description="What the commit of this version ingested.")
    path: str = Field(..., description="Store key of the Delta table (`datasets/<name>`).")
    parts: list[str] = Field(..., description="The Parquet files of this table version in row order (store keys).")
    rows: int
    bytes: int
    schema_: dict[str, str] = Field(..., alias="schema", description="Column -> Arrow type.")
    spec_hash: str
    table_version: int = Field(0, description="The Delta table version (time travel reads it back).")
    added_files: list[str] = Field(default_factory=list, description="The files this version's commit added.")
    added_rows: int = Field(0, description="The rows this version's commit added.")
    content_hash: str = Field("", description="Hash of the table's rows at this version (also in the commit).")
    added_hash: str = Field("", description="Hash of the rows the commit added (its idempotency key).")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class FailedExpectation(BaseModel):
    expectation: str
    column: str | None = None
    detail: str = ""


class ValidationReport(Record):
    """The verdict of the validation gate on one dataset version."""

    kind: ClassVar[str] = "validation"
    event: ClassVar[str | None] = "lifecycle.dataset.validated"
    dataset_version: str
    success: bool
    evaluated: int
    failed: list[FailedExpectation] = Field(default_factory=list)
    docs_key: str | None = Field(None, description="Store key of the Data Docs index page.")

    @property
    def quarantined(self) -> bool:
        return not self.success


class EmbeddingSet(Record):
    """Vectors for the text column of one dataset version, keyed by row id."""

    kind: ClassVar[str] = "embeddings"
    event: ClassVar[str | None] = "lifecycle.embeddings.created"
    dataset_version: str
    model: str
    dim: int
    rows: int
    parts: list[str] = Field(..., description="Vector Parquet files in dataset row order; an append's set starts "
                             "with the parts of the set it extends (referenced, not copied).")
    encoded_rows: int = Field(..., description="Rows encoded by this run (others reused).")
    seconds: float = 0.0
    part_rows: list[int] = Field(default_factory=list, description="Rows of each part (empty: not recorded).")
    dataset_parts: list[str] = Field(
        default_factory=list, description="The dataset files the set covers, in order: how a later append is seen.")
    vectors_key: str = Field("", description="Hash of what decides a vector (model, encoding, text column, cut).")
    extends: str | None = Field(None, description="The earlier set whose parts this one starts with (an append).")


class IndexVersion(Record):
    """A LanceDB table version holding one embedding set, with its measured recall."""

    kind: ClassVar[str] = "index"
    event: ClassVar[str | None] = "lifecycle.index.built"
    dataset_version: str
    embedding_set: str
    uri: str
    table: str
    table_version: int
    tag: str
    index_type: IndexType
    index_params: dict[str, Any] = Field(default_factory=dict)
    rows: int
    k: int
    recall_at_k: float
    p50_ms: float
    p95_ms: float
    write: Literal["overwrite", "merge_insert"] = Field(
        "overwrite", description="How the rows entered this table version: all rewritten, or the new ones merged.")
    added_rows: int = Field(0, description="Rows this table version added (all rows for an overwrite).")
    index_action: Literal["built", "extended", "rebuilt", "exact"] = Field(
        "built", description="built: the ladder on a fresh table; extended: new rows merged into the earlier "
        "index; rebuilt: the ladder again on a grown table; exact: no ANN index.")
    index_reason: str = Field("", description="Why this index action was taken.")
    trained_rows: int = Field(0, description="Rows the ANN index was trained on (its last build); 0 when exact.")


class TrainedModel(Record):
    """A trained model logged to MLflow with its holdout metrics."""

    kind: ClassVar[str] = "model"
    event: ClassVar[str | None] = "lifecycle.model.trained"
    dataset_version: str
    embedding_set: str | None = None
    run_id: str
    model_uri: str
    metrics: dict[str, float]
    primary_metric: str
    greater_is_better: bool
    device: str = "cpu"
    train_seconds: float = 0.0
    baseline_metrics: dict[str, float] = Field(
        default_factory=dict, description="The linear baseline's holdout metrics (same split, same run).")
    baseline: str = Field("", description="What the baseline was fit on (features, rows, id-hash sample).")
    layout: str = Field("", description="Training layout: single (one worker) or distributed.")
    family: Literal["xgboost", "linear"] = Field(
        "xgboost", description="The model family registered (`metrics` are its own): train.model, or auto's pick.")
    family_reason: str = Field("", description="Why this family: forced by train.model, or auto's comparison.")
    xgboost_metrics: dict[str, float] = Field(
        default_factory=dict, description="The xgboost model's holdout metrics, whichever family is registered.")
    rows: dict[str, int] = Field(
        default_factory=dict, description="Rows trained on: train and holdout sides of the split, eval slice.")


class ModelVersion(Record):
    """A registered model version and the promotion decision taken for it."""

    kind: ClassVar[str] = "model_version"
    event: ClassVar[str | None] = "lifecycle.model.registered"
    promoted_event: ClassVar[str] = "lifecycle.model.promoted"  # a registration that moved @champion
    model_name: str
    version: str
    run_id: str
    trained_model: str
    aliases: list[str]
    promoted: bool
    decision: str
    metric: str
    challenger_value: float
    champion_version: str | None = None
    champion_value: float | None = None
    baseline_value: float | None = Field(None, description="The baseline's value of `metric` on the same holdout.")
    beats_baseline: bool | None = Field(None, description="Whether the model beats it by train.baseline_margin.")
    baseline_verdict: str = Field("", description='"beats baseline by X", "does not beat baseline (X vs Y)", '
                                  'or "is the baseline (…)" for a linear model.')
    family: Literal["xgboost", "linear"] = Field("xgboost", description="The registered model's family.")


class PromotionAudit(Record):
    """One decision about a model's `champion` alias (register, `lifecycle promote`, `lifecycle rollback`).

    The chain of audits is how `rollback` finds the champion before the current one.
    """

    kind: ClassVar[str] = "promotion"
    event: ClassVar[str | None] = "lifecycle.model.champion_decided"
    model_name: str
    action: Literal["register", "promote", "rollback"]
    version: str = Field(..., description="The version decided about (the champion after, when moved).")
    previous: str | None = Field(None, description="The champion before the decision.")
    moved: bool = Field(..., description="Whether `champion` now points at `version` because of this decision.")
    decision: str
    actor: str = ""


class Deployment(Record):
    """What is being served where, and how the rollout went."""

    kind: ClassVar[str] = "deployment"
    event: ClassVar[str | None] = "lifecycle.model.deployed"
    model_name: str
    model_version: str
    index_version: str | None
    target: str
    endpoint: str
    handle: str = Field(..., description="PID or container id of the server.")
    status: Literal["serving", "failed", "stopped"]
    previous: str | None = None
    reason: str | None = Field(None, description="Why the rollout failed (status failed).")
    image_digest: str | None = Field(None, description="Docker target: id of the image served.")
    image_size_mb: float | None = Field(None, description="Docker target: size of that image.")


R = TypeVar("R", bound=Record)

RECORD_TYPES: dict[str, type[Record]] = {
    cls.kind: cls
    for cls in (DatasetVersion, ValidationReport, EmbeddingSet, IndexVersion, TrainedModel, ModelVersion, Deployment,
                PromotionAudit)
}


def record_key(cls: type[Record], record_id: str) -> str:
    return f"records/{cls.kind}/{record_id}.json"


def latest_key(cls: type[Record], dataset: str) -> str:
    return f"records/latest/{dataset}/{cls.kind}.json"


def dump_record(record: Record) -> bytes:
    return record.model_dump_json(indent=2, by_alias=True).encode()


def parse_record(cls: type[R], data: bytes) -> R:
    return cls.model_validate_json(data)
