"""The served model: an XGBoost booster (or the linear model, `serving.linear`) plus its feature schema.

`load_model` reads `feature_schema.json` and loads the family it names (`family`: `booster.json` or
`linear_model.npz`); both answer through the same methods with the same JSON.

Only `booster.json` and `feature_schema.json` are loaded (no MLflow, no pyfunc), because MLflow's
scoring path spends ~3 ms of Python per request on DataFrame building and schema checks while the
trees take 0.1 ms (STACK-NOTES, serving). Answers have the shape of the MLflow pyfunc's
(`serving.pyfunc`): one `{"prediction": …}` per row, plus `proba_<class>` on request, so a client sees
the same JSON from `mlflow models serve` and from this server. Two entry points give the same answers:

- `predict(frame)`: the reference path through `lifecycle.features.feature_matrix`, as training uses.
- `predict_columns(columns)`: the request path; it builds the same float32 matrix straight from the
  JSON column lists with numpy (tens of µs instead of ~2–5 ms of pandas per request). Anything it
  cannot convert falls back to the reference path, so errors carry the reference path's message. The
  tests check that both paths (and the MLflow pyfunc) agree, nulls and unseen levels included.

Every feature setting comes from the model's own `feature_schema.json` (what the train stage saved),
never from a constant here: texts are cut at the schema's `text_max_chars` (the spec's
`embed.max_chars` the embeddings were made with) and encoded by the schema's `text_model`, so a
request's text features are the vectors the model was trained on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lifecycle.errors import LifecycleError
from lifecycle.features import FeatureSchema, decode_predictions, feature_matrix, tabular_matrix
from lifecycle.spec import Task
from serving.linear import LINEAR_FILE, LinearModel

BOOSTER_FILE = "booster.json"
SCHEMA_FILE = "feature_schema.json"
RUN_ARTIFACT_DIR = "lifecycle"  # where train logs the two files in its MLflow run (serving.pyfunc's name)
MODEL_FILES = {"xgboost": BOOSTER_FILE, "linear": LINEAR_FILE}  # the schema's `family` says which one serves

PROBA_PREFIX = "proba_"  # as serving.pyfunc names probability columns (that module imports mlflow)

Encoder = Callable[[list[str]], np.ndarray]


def text_encoder(schema: FeatureSchema, threads: int | None = None) -> Encoder:
    """The embed stage's encoder and text preparation (lifecycle.encoder), as the schema says, loaded once.

    `threads` caps torch's intra-op threads (None: torch's default, one per core).

    Raises:
        LifecycleError: the model's embeddings come from an encoder this server does not have.
    """
    from lifecycle.encoder import MODEL_NAME, encode, load_encoder, prepare_texts

    if schema.text_model != MODEL_NAME:
        raise LifecycleError(f"model's text features come from encoder {schema.text_model!r}; "
                             f"this server has {MODEL_NAME!r}")
    max_chars = schema.text_max_chars
    load_encoder("cpu", threads)  # load now, before the port opens, not on the first request
    return lambda texts: encode(prepare_texts(texts, max_chars))


def sample_row(schema: FeatureSchema) -> dict[str, Any]:
    """A valid input row built from the schema alone: what the deploy smoke test sends."""
    row: dict[str, Any] = {c: 0.0 for c in schema.numeric}
    row.update({c: (levels[0] if levels else None) for c, levels in schema.categorical.items()})
    if schema.reads_text and schema.text_column:
        row[schema.text_column] = "smoke test"
    return row


def missing_files(names: Collection[str]) -> list[str]:
    """What a model folder (or a run's artifact list) lacks to be served: the schema and a model file."""
    missing = [] if SCHEMA_FILE in names else [SCHEMA_FILE]
    if not any(f in names for f in MODEL_FILES.values()):
        missing.append(" or ".join(MODEL_FILES.values()))
    return missing


def read_schema(model_dir: str | Path) -> FeatureSchema:
    """The folder's `feature_schema.json`.

    Raises:
        LifecycleError: the file is missing or not a feature schema.
    """
    schema_path = Path(model_dir) / SCHEMA_FILE
    try:
        return FeatureSchema.model_validate_json(schema_path.read_bytes())
    except FileNotFoundError as exc:
        raise LifecycleError(f"{schema_path}: feature schema not found") from exc
    except ValueError as exc:
        raise LifecycleError(f"{schema_path}: not a valid feature schema ({str(exc).splitlines()[0]})") from exc


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


class ServingModel:
    """A loaded booster and its schema; safe to call from many threads (XGBoost prediction is)."""

    def __init__(self, booster: Any, schema: FeatureSchema, encoder: Encoder | None = None) -> None:
        self.booster = booster
        self.schema = schema
        self._encoder = encoder
        self._levels = {col: {lvl: float(i) for i, lvl in enumerate(levels)}
                        for col, levels in schema.categorical.items()}

    @classmethod
    def load(cls, model_dir: str | Path, encoder: Encoder | None = None,
             encoder_threads: int | None = None) -> ServingModel:
        """Load `booster.json` + `feature_schema.json` from a snapshot folder.

        Raises:
            LifecycleError: naming the file that is missing or unreadable, or a model/schema mismatch.
        """
        import xgboost as xgb

        model_dir = Path(model_dir)
        schema_path, booster_path = model_dir / SCHEMA_FILE, model_dir / BOOSTER_FILE
        schema = read_schema(model_dir)
        if not booster_path.exists():
            raise LifecycleError(f"{booster_path}: model file not found")
        try:
            booster = xgb.Booster(model_file=str(booster_path))
        except xgb.core.XGBoostError as exc:
            raise LifecycleError(f"{booster_path}: not a valid XGBoost model ({str(exc).splitlines()[0]})") from exc
        if booster.num_features() != len(schema.feature_names):
            raise LifecycleError(
                f"{booster_path}: model has {booster.num_features()} features, "
                f"{schema_path.name} describes {len(schema.feature_names)}"
            )
        # One thread per prediction: requests are tiny, and OpenMP start-up costs ~10x the trees
        # (3.8 ms vs 0.37 ms per row measured); concurrency comes from serving requests in parallel.
        booster.set_param({"nthread": 1})
        booster.set_param({"device": "cpu"})  # a GPU-trained model must not look for a GPU here
        if schema.embedding_dim and encoder is None:
            encoder = text_encoder(schema, threads=encoder_threads)
        return cls(booster, schema, encoder)

    @property
    def needs_text(self) -> bool:
        """True when requests must be embedded first (slow: run off the event loop)."""
        return bool(self.schema.embedding_dim)

    def text_features(self, texts: Sequence[Any]) -> np.ndarray | None:
        """The embedding features of raw texts (None for a model without them), prepared as in training."""
        if not self.schema.embedding_dim:
            return None
        if self._encoder is None:
            raise LifecycleError(f"model needs embeddings of {self.schema.text_column!r} but no encoder is loaded")
        return self._encoder(list(texts))

    def _records(self, matrix: np.ndarray, probabilities: bool) -> list[dict[str, Any]]:
        labels, proba = decode_predictions(np.asarray(self.booster.inplace_predict(matrix)), self.schema)
        if not probabilities or proba is None:
            return [{"prediction": label} for label in labels]
        names = [f"{PROBA_PREFIX}{c}" for c in self.schema.classes]
        return [{"prediction": label, **dict(zip(names, p))} for label, p in zip(labels, proba.astype(float).tolist())]

    def predict(self, frame: pd.DataFrame, probabilities: bool = False) -> list[dict[str, Any]]:
        """One dict per row, as the MLflow pyfunc (`serving.pyfunc`) answers: `prediction`, plus
        `proba_<class>` for classifiers when `probabilities` is set."""
        if len(frame) == 0:
            return []
        text = self.schema.text_column
        if self.schema.embedding_dim:
            tabular_matrix(frame, self.schema)  # a bad value fails here, before seconds of encoding
        emb = self.text_features(frame[text].tolist()) if self.schema.embedding_dim and text in frame else None
        return self._records(feature_matrix(frame, self.schema, emb), probabilities)

    def predict_columns(self, columns: Mapping[str, Sequence[Any]], rows: int,
                        probabilities: bool = False) -> list[dict[str, Any]]:
        """Same as `predict`, from column lists of equal length `rows` (the request fast path).

        Raises:
            LifecycleError: a missing column or a value that is not numeric (message of `feature_matrix`).
        """
        if rows == 0:
            return []
        schema = self.schema
        try:
            matrix = np.empty((rows, len(schema.numeric) + len(schema.categorical)), dtype=np.float32)
            for j, col in enumerate(schema.numeric):
                values = columns[col]
                if any(isinstance(v, (str, bool)) for v in values):
                    raise TypeError(col)  # pandas parses/refuses these its own way: use the reference path
                matrix[:, j] = np.asarray(values, dtype=np.float32)
            for k, (col, codes) in enumerate(self._levels.items(), start=len(schema.numeric)):
                matrix[:, k] = [
                    math.nan if _is_missing(v) else codes.get(v if isinstance(v, str) else str(v), math.nan)
                    for v in columns[col]
                ]
        except (KeyError, TypeError, ValueError, OverflowError):
            return self.predict(pd.DataFrame({c: list(v) for c, v in columns.items()}), probabilities)
        if schema.embedding_dim:
            text = schema.text_column
            if text is None or text not in columns:
                raise LifecycleError(f"missing input column(s): {text}")
            emb = self.text_features(columns[text])
            if emb is not None:
                matrix = np.hstack([matrix, emb])
        return self._records(matrix, probabilities)

    def check_columns(self, columns: Mapping[str, Sequence[Any]], rows: int) -> None:
        """Raise what `predict_columns` would raise for these values, without encoding any text.

        Raises:
            LifecycleError: a missing column or a value that is not numeric.
        """
        if rows:
            tabular_matrix(pd.DataFrame({c: list(columns[c]) for c in self.schema.input_columns if c in columns}),
                           self.schema)
            if self.schema.embedding_dim and self.schema.text_column not in columns:
                raise LifecycleError(f"missing input column(s): {self.schema.text_column}")

    @property
    def task(self) -> Task:
        return self.schema.task


Served = ServingModel | LinearModel  # what a server answers with: same methods, same answers' shape


def load_model(model_dir: str | Path, encoder: Encoder | None = None, encoder_threads: int | None = None) -> Served:
    """The folder's model, of the family its schema names: a booster or the linear model.

    Raises:
        LifecycleError: naming the file that is missing or unreadable.
    """
    schema = read_schema(model_dir)
    if schema.family == "linear":
        return LinearModel.load(Path(model_dir) / LINEAR_FILE, schema)
    return ServingModel.load(model_dir, encoder, encoder_threads)
