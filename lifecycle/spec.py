"""The dataset spec: what a user writes to run the lifecycle on their own data.

A spec is YAML validated by pydantic. It names the source, the columns and their roles, the
expectations that gate the data, how to split it and how to train. Every stage reads the part it
needs, and the spec's hash is part of each stage's cache key, so editing the spec re-runs exactly the
stages it affects.
"""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lifecycle.errors import LifecycleError


class Task(str, Enum):
    """The learning task; decides the objective, the metrics and the label handling."""

    binary = "binary"
    multiclass = "multiclass"
    regression = "regression"


class ColumnRange(BaseModel):
    """Inclusive bounds a numeric column must stay within."""

    model_config = ConfigDict(extra="forbid")
    min: float | None = None
    max: float | None = None


class Expectations(BaseModel):
    """Overrides for the validation suite built from the spec.

    The suite always checks the schema, non-null ids and labels, id uniqueness and the label set;
    these fields add bounds the data cannot tell us by itself.
    """

    model_config = ConfigDict(extra="forbid")
    min_rows: int = Field(1, ge=0, description="Fewest rows a valid version may have.")
    max_rows: int | None = Field(None, description="Most rows a valid version may have.")
    ranges: dict[str, ColumnRange] = Field(default_factory=dict, description="Numeric bounds per column.")
    allowed_labels: list[str] | None = Field(
        None, description="Label values allowed (classification); default: any, but at least two classes."
    )
    not_null: list[str] = Field(default_factory=list, description="Extra columns that must have no nulls.")
    max_null_fraction: float = Field(
        0.05, ge=0, le=1, description="Largest share of nulls allowed in any feature column."
    )


class SplitConfig(BaseModel):
    """Deterministic holdout split by a hash of the row id, so the same row is always on the same side."""

    model_config = ConfigDict(extra="forbid")
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    salt: str = Field("lifecycle", description="Changing the salt draws a different holdout.")


class TrainWindow(BaseModel):
    """Which rows of the table version training sees: those of its latest commits, or of its latest days.

    Counted back from the version itself (its commits and their commit times), never from the clock,
    so a version always trains on the same rows. Commits before the last `replace` are never in it.
    """

    model_config = ConfigDict(extra="forbid")
    commits: int | None = Field(None, ge=1, description="The rows the latest N commits added.")
    days: float | None = Field(None, gt=0, description="The rows committed within N days before the version's commit.")

    @model_validator(mode="after")
    def _one_bound(self) -> TrainWindow:
        if (self.commits is None) == (self.days is None):
            raise ValueError("give exactly one of `commits` or `days`")
        return self


class TrainConfig(BaseModel):
    """The model family, XGBoost parameters and the promotion rule."""

    model_config = ConfigDict(extra="forbid")
    num_boost_round: int = Field(100, ge=1, le=100_000)
    max_depth: int = Field(6, ge=1, le=32)
    learning_rate: float = Field(0.1, gt=0, le=1)
    early_stopping_rounds: int | None = Field(20, ge=1)
    use_text_embeddings: bool = Field(
        False, description="Add the text column's embeddings as features (serving then embeds requests)."
    )
    metric: str | None = Field(
        None, description="Promotion metric; default accuracy (classification) or rmse (regression)."
    )
    promotion_margin: float = Field(
        0.0, ge=0, description="How much better than the champion a challenger must be to be promoted."
    )
    model: Literal["xgboost", "linear", "auto"] = Field(
        "auto", description="Model family registered: `xgboost`, `linear` (the baseline itself: logistic "
        "regression / ridge on TF-IDF + one-hot + scaled numerics), or `auto`: xgboost only where it beats "
        "the linear model by `baseline_margin` on the holdout, else the linear model (both are logged)."
    )
    require_beats_baseline: bool = Field(
        True, description="Promote only a challenger that beats the linear baseline trained in the same run "
        "(a linear model chosen by `model: auto` or `linear` is the baseline, and may be promoted)."
    )
    baseline_margin: float = Field(0.0, ge=0, description="How much better than the baseline a challenger must be.")
    baseline_max_rows: int = Field(
        200_000, ge=100, description="Larger data fits the baseline on an id-hash sample of this many rows."
    )
    window: TrainWindow | None = Field(
        None, description="Train on the latest commits or days of the table only (default: every row).")
    seed: int = 0

    def primary_metric(self, task: Task) -> str:
        return self.metric or ("rmse" if task is Task.regression else "accuracy")


class EmbedConfig(BaseModel):
    """How the text column becomes vectors."""

    model_config = ConfigDict(extra="forbid")
    model: Literal["all-MiniLM-L6-v2"] = "all-MiniLM-L6-v2"
    batch_size: int = Field(64, ge=1, le=4096)
    max_chars: int = Field(2000, ge=1, description="Longer texts are truncated before encoding.")
    rows_per_task: int = Field(2000, ge=1, description="Rows each Dask task embeds (fewer when a small "
                               "version would leave workers idle).")


class IndexConfig(BaseModel):
    """When to build an ANN index and what recall it must reach."""

    model_config = ConfigDict(extra="forbid")
    ann_min_rows: int = Field(
        100_000, ge=1, description="Below this, search is exact (fast and exact at this size)."
    )
    target_recall: float = Field(0.95, gt=0, le=1)
    recall_sample: int = Field(100, ge=1, description="Queries drawn from the data to measure recall@k.")
    k: int = Field(10, ge=1)
    rebuild_unindexed_fraction: float = Field(
        0.2, gt=0, le=1, description="An append merges its rows into the existing ANN index until the share of "
        "rows the index was not trained on exceeds this; then the index is rebuilt (also when recall drops).")
    metadata_columns: list[str] = Field(
        default_factory=list, description="Columns stored beside the vectors (default: label + categoricals)."
    )


class IngestConfig(BaseModel):
    """How a source or a landing enters the dataset's table."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["append", "replace"] = Field(
        "append", description="append: each landing is one more commit; replace: the source becomes the whole table."
    )
    allow_new_columns: list[str] = Field(
        default_factory=list, description="Nullable columns a later landing may add to the table."
    )


class DatasetSpec(BaseModel):
    """A dataset and everything the lifecycle needs to know to run on it."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$", description="Dataset name (lake folder, model).")
    source: str = Field(..., description="Local path, file:// or s3:// URI of the raw data.")
    format: Literal["csv", "parquet", "jsonl", "auto"] = "auto"
    id_column: str
    label_column: str
    task: Task
    numeric_features: list[str] = Field(default_factory=list)
    categorical_features: list[str] = Field(default_factory=list)
    text_column: str | None = None
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    expectations: Expectations = Field(default_factory=Expectations)
    split: SplitConfig = Field(default_factory=SplitConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)

    @field_validator("numeric_features", "categorical_features")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("feature names must be unique")
        return value

    @model_validator(mode="after")
    def _roles_disjoint(self) -> DatasetSpec:
        roles = [self.id_column, self.label_column, *self.numeric_features, *self.categorical_features]
        if self.text_column:
            roles.append(self.text_column)
        dupes = sorted({c for c in roles if roles.count(c) > 1})
        if dupes:
            raise ValueError(f"columns used in more than one role: {', '.join(dupes)}")
        if not (self.numeric_features or self.categorical_features or self.train.use_text_embeddings):
            raise ValueError("the spec names no features to train on")
        if self.train.use_text_embeddings and not self.text_column:
            raise ValueError("train.use_text_embeddings needs text_column")
        return self

    @property
    def required_columns(self) -> list[str]:
        """Every column the raw data must have, in a stable order."""
        cols = [self.id_column, self.label_column, *self.numeric_features, *self.categorical_features]
        return cols + ([self.text_column] if self.text_column else [])

    def section_hash(self, *sections: str) -> str:
        """A short stable hash of some fields of the spec: a stage's config part of its cache key."""
        data = self.model_dump(mode="json", include=set(sections) if sections else None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> DatasetSpec:
    """Read and validate a spec file; relative `source` paths are taken relative to the spec file.

    Raises:
        LifecycleError: one line naming the file and the first problems found.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise LifecycleError(f"{path}: spec file not found") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise LifecycleError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(raw, dict):
        raise LifecycleError(f"{path}: a spec is a YAML mapping")
    raw.update(overrides or {})
    source = str(raw.get("source", ""))
    if source and "://" not in source and not Path(source).is_absolute():
        raw["source"] = str((path.parent / source).resolve())
    return parse_spec(raw, origin=str(path))


def parse_spec(raw: dict[str, Any], origin: str = "spec") -> DatasetSpec:
    """Validate a spec mapping, turning pydantic's report into one line per the CLI's contract."""
    try:
        return DatasetSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg']}" for err in exc.errors()[:3]
        )
        raise LifecycleError(f"{origin}: invalid spec: {problems}") from exc
