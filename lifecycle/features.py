"""Feature handling shared by training and serving, so both turn rows into the same matrix.

The schema is learned from the training data (category levels, label classes) and saved next to the
model; serving rebuilds the identical float32 matrix from request rows. Categoricals become integer
codes typed `c` for XGBoost's native categorical splits; unseen levels and nulls become NaN (missing).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from lifecycle.errors import LifecycleError
from lifecycle.spec import DatasetSpec, Task

EMBEDDING_PREFIX = "emb_"


class FeatureSchema(BaseModel):
    """Everything needed to rebuild the model's input matrix from raw rows."""

    task: Task
    label_column: str
    id_column: str
    numeric: list[str]
    categorical: dict[str, list[str]] = Field(description="Column -> levels in code order.")
    text_column: str | None = None
    embedding_dim: int = Field(0, description="Embedding features appended after tabular ones (0 = none).")
    text_model: str = Field("all-MiniLM-L6-v2", description="Encoder of the embedding features (spec embed.model).")
    text_max_chars: int = Field(2000, ge=1, description="Texts are cut to this length before encoding "
                                "(spec embed.max_chars); serving must cut requests alike.")
    classes: list[str] = Field(default_factory=list, description="Label classes in index order.")
    family: Literal["xgboost", "linear"] = Field(
        "xgboost", description="The model family, and so the model file served beside this schema.")
    raw_text: bool = Field(False, description="The model reads the text column itself (the linear model's TF-IDF).")

    @property
    def reads_text(self) -> bool:
        """Whether requests must carry the text column (embedded, or read as TF-IDF)."""
        return bool(self.text_column) and (bool(self.embedding_dim) or self.raw_text)

    @property
    def input_columns(self) -> list[str]:
        cols = [*self.numeric, *self.categorical]
        return cols + ([self.text_column] if self.reads_text and self.text_column else [])

    @property
    def feature_names(self) -> list[str]:
        emb = [f"{EMBEDDING_PREFIX}{i}" for i in range(self.embedding_dim)]
        return [*self.numeric, *self.categorical, *emb]

    @property
    def feature_types(self) -> list[str]:
        return ["q"] * len(self.numeric) + ["c"] * len(self.categorical) + ["q"] * self.embedding_dim


def build_schema(spec: DatasetSpec, categories: dict[str, list[str]], classes: list[str],
                 embedding_dim: int = 0) -> FeatureSchema:
    """The schema for a spec, given the levels and classes observed in the training data."""
    if spec.task is not Task.regression and len(classes) < 2:
        only = classes[0] if classes else "nothing"
        raise LifecycleError(
            f"label column {spec.label_column!r} has one class ({only}); classification needs at least two"
        )
    if spec.task is Task.binary and len(classes) != 2:
        raise LifecycleError(f"label column {spec.label_column!r} has {len(classes)} classes; task binary needs 2")
    return FeatureSchema(
        task=spec.task,
        label_column=spec.label_column,
        id_column=spec.id_column,
        numeric=list(spec.numeric_features),
        categorical={c: sorted(categories.get(c, [])) for c in spec.categorical_features},
        text_column=spec.text_column,
        embedding_dim=embedding_dim,
        text_model=spec.embed.model,
        text_max_chars=spec.embed.max_chars,
        classes=classes,
    )


def tabular_matrix(frame: pd.DataFrame, schema: FeatureSchema) -> np.ndarray:
    """Numeric + categorical-code columns as float32, NaN for nulls and unseen levels.

    Raises:
        LifecycleError: naming the first missing column or a numeric column that is not numeric.
    """
    missing = [c for c in [*schema.numeric, *schema.categorical] if c not in frame.columns]
    if missing:
        raise LifecycleError(f"missing input column(s): {', '.join(missing)}")
    out = np.empty((len(frame), len(schema.numeric) + len(schema.categorical)), dtype=np.float32)
    for j, col in enumerate(schema.numeric):
        try:
            out[:, j] = pd.to_numeric(frame[col], errors="raise").to_numpy(dtype=np.float32, na_value=np.nan)
        except (ValueError, TypeError) as exc:
            raise LifecycleError(f"column {col!r} must be numeric ({exc})") from exc
    for k, (col, levels) in enumerate(schema.categorical.items(), start=len(schema.numeric)):
        codes = pd.Categorical(frame[col].astype("string"), categories=levels).codes.astype(np.float32)
        codes[codes < 0] = np.nan
        out[:, k] = codes
    return out


def feature_matrix(frame: pd.DataFrame, schema: FeatureSchema, embeddings: np.ndarray | None = None) -> np.ndarray:
    """The full model input: tabular features, then embeddings when the schema uses them."""
    tab = tabular_matrix(frame, schema)
    if not schema.embedding_dim:
        return tab
    if embeddings is None or embeddings.shape != (len(frame), schema.embedding_dim):
        raise LifecycleError(f"model needs {schema.embedding_dim}-d embeddings of {schema.text_column!r}")
    return np.hstack([tab, embeddings.astype(np.float32, copy=False)])


def encode_labels(labels: pd.Series, schema: FeatureSchema) -> np.ndarray:
    """Label values -> class indices (classification) or floats (regression)."""
    if schema.task is Task.regression:
        return pd.to_numeric(labels, errors="raise").to_numpy(dtype=np.float32)
    codes = pd.Categorical(labels.astype("string"), categories=schema.classes).codes
    if (codes < 0).any():
        unknown = labels[codes < 0].iloc[0]
        raise LifecycleError(f"label {unknown!r} is not one of the training classes")
    return codes.astype(np.float32)


def decode_predictions(raw: np.ndarray, schema: FeatureSchema) -> tuple[list, np.ndarray | None]:
    """Model output -> (predicted labels, class probabilities or None)."""
    if schema.task is Task.regression:
        return raw.astype(float).tolist(), None
    if raw.ndim == 1:  # binary:logistic gives P(class 1)
        proba = np.column_stack([1 - raw, raw])
    else:
        proba = raw
    classes = np.asarray(schema.classes, dtype=object)
    return classes[proba.argmax(axis=1)].tolist(), proba
