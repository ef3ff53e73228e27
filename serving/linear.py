"""The served linear model: TF-IDF + one-hot + scaled numerics → one sparse product, without sklearn.

Why this shape:
- When the plain baseline wins (text-driven labels: TF-IDF + logistic regression scored 0.772 against
  xgboost's 0.702 on a 64k-row catalogue), the registered model is that linear model, and it must
  serve as fast as the trees. sklearn's `Pipeline.predict_proba` costs ~1 ms of validation and
  DataFrame handling per call; the model itself is a dictionary lookup per token and a dot product.
- The train stage exports the fitted pipeline into ONE file (`linear_model.npz`, beside
  `feature_schema.json`): the vectorizer's settings, vocabulary and idf, the one-hot levels, the
  imputer's medians, the scaler's mean/scale, coef/intercept and the output classes. Loaded with
  `allow_pickle=False`: a model file can carry numbers and text, never code.
- `tfidf` reproduces `TfidfVectorizer.transform` step by step (lowercase, the token regex, word
  n-grams joined by a space, counts, `log(tf) + 1`, × idf, l2 row norm summed in column order) so
  the served features equal the trained ones bit for bit; a test compares them with sklearn's on odd
  text (unicode, punctuation, empty, None, very long).
- Rows become one CSR matrix (text terms, one-hot codes, scaled numerics in the ColumnTransformer's
  column order) multiplied with the weights in numpy: a gather and one product, no scipy.
- Two entry points give the same answers, as for the booster (`serving.model`): `predict(frame)`
  reads values with pandas (the reference), `predict_columns(columns, rows)` reads JSON column lists
  in plain Python (the request path) and hands anything it cannot read to the reference path.
  Answers have the booster's shape: one `{"prediction": …}` per row, `proba_<class>` on request.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from lifecycle.errors import LifecycleError
from lifecycle.features import FeatureSchema, decode_predictions
from lifecycle.spec import Task

LINEAR_FILE = "linear_model.npz"
PROBA_PREFIX = "proba_"  # as serving.model and serving.pyfunc name probability columns
FORMAT = 1
LOG_TABLE = 4096  # `log(tf) + 1` precomputed (with numpy's log, as sklearn) for term counts below this


class TextSettings(BaseModel):
    """The TfidfVectorizer settings the scorer reproduces (word analyzer, no stop words, no accents)."""

    model_config = ConfigDict(extra="forbid")
    column: str
    lowercase: bool = True
    token_pattern: str = r"(?u)\b\w\w+\b"
    ngram_range: tuple[int, int] = (1, 1)
    sublinear_tf: bool = False
    use_idf: bool = True
    norm: Literal["l2"] | None = "l2"


class LinearSettings(BaseModel):
    """What `linear_model.npz` holds besides its arrays (the `meta` entry, JSON)."""

    model_config = ConfigDict(extra="forbid")
    format: int = FORMAT
    kind: Literal["logistic", "ridge"]
    text: TextSettings | None = None
    categorical: dict[str, list[str]] = Field(default_factory=dict, description="One-hot levels in column order.")
    numeric: list[str] = Field(default_factory=list)
    vocabulary_size: int = 0


def pack(settings: LinearSettings, vocabulary: Sequence[str], arrays: Mapping[str, np.ndarray], path: Path) -> None:
    """Write the model file: settings + vocabulary as UTF-8 bytes (terms never hold a newline), numbers as arrays."""
    if any("\n" in term for term in vocabulary):
        raise LifecycleError("a vocabulary term holds a newline; the model file cannot store it")
    entries: dict[str, Any] = {k: np.asarray(v) for k, v in arrays.items()}
    entries["meta"] = np.frombuffer(settings.model_dump_json().encode(), dtype=np.uint8)
    entries["vocabulary"] = np.frombuffer("\n".join(vocabulary).encode(), dtype=np.uint8)
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **entries)


def _softmax(x: np.ndarray) -> np.ndarray:
    """sklearn.utils.extmath.softmax, step by step (what LogisticRegression.predict_proba returns)."""
    x = x - x.max(axis=1, keepdims=True)
    np.exp(x, x)
    x /= x.sum(axis=1, keepdims=True)
    return x


def _text_value(value: Any) -> str:
    """A request value as the baseline read it (`astype("string").fillna("")`)."""
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


class LinearModel:
    """A loaded linear model and the schema it was trained with; read-only, so safe across threads."""

    def __init__(self, schema: FeatureSchema, settings: LinearSettings, vocabulary: list[str],
                 arrays: Mapping[str, np.ndarray]) -> None:
        self.schema, self.settings = schema, settings
        self.vocabulary = {term: j for j, term in enumerate(vocabulary)}
        self.idf = np.asarray(arrays.get("idf", np.ones(len(vocabulary))), dtype=np.float64)
        self._idf: list[float] = self.idf.tolist()
        self._log_tf: list[float] = [0.0, *(np.log(np.arange(1, LOG_TABLE, dtype=np.float64)) + 1.0).tolist()]
        self.coef = np.ascontiguousarray(arrays["coef"], dtype=np.float64)  # (features, outputs)
        self.intercept = np.asarray(arrays["intercept"], dtype=np.float64).reshape(-1)
        self.class_index = np.asarray(arrays.get("class_index", np.zeros(0)), dtype=np.int64)
        self.median = np.asarray(arrays.get("median", np.zeros(0)), dtype=np.float64)
        self.mean = np.asarray(arrays.get("mean", np.zeros(0)), dtype=np.float64)
        self.scale = np.asarray(arrays.get("scale", np.zeros(0)), dtype=np.float64)
        text = settings.text
        self._pattern = re.compile(text.token_pattern) if text else None
        offset = len(vocabulary)
        self._levels: list[tuple[str, dict[str, int]]] = []
        for col, levels in settings.categorical.items():
            self._levels.append((col, {lvl: offset + i for i, lvl in enumerate(levels)}))
            offset += len(levels)
        self._numeric_at = np.arange(offset, offset + len(settings.numeric), dtype=np.int64)
        width = offset + len(settings.numeric)
        if self.coef.shape[0] != width or self.coef.shape[1] != self.intercept.shape[0]:
            raise LifecycleError(f"linear model has {self.coef.shape[0]}×{self.coef.shape[1]} weights for "
                                 f"{width} features and {self.intercept.shape[0]} outputs")
        self.input_columns = [*settings.numeric, *settings.categorical, *([text.column] if text else [])]
        outputs = 2 if settings.kind == "logistic" and self.coef.shape[1] == 1 else self.coef.shape[1]
        problems = []
        if sorted(self.input_columns) != sorted(schema.input_columns):
            problems.append(f"columns {self.input_columns} vs the schema's {schema.input_columns}")
        if settings.kind == "logistic" and (len(self.class_index) != outputs
                                            or self.class_index.max(initial=0) >= len(schema.classes)):
            problems.append(f"{len(self.class_index)} class indices for {outputs} outputs, "
                            f"{len(schema.classes)} classes")
        if not len(self.median) == len(self.mean) == len(self.scale) == len(settings.numeric):
            problems.append("numeric statistics do not match the numeric columns")
        if problems:
            raise LifecycleError(f"linear model does not fit its feature schema: {'; '.join(problems)}")

    @classmethod
    def load(cls, path: str | Path, schema: FeatureSchema) -> LinearModel:
        """Load a `linear_model.npz` trained with `schema` (serving.model reads the schema beside it).

        Raises:
            LifecycleError: naming the file when it is missing or unreadable.
        """
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            settings = LinearSettings.model_validate_json(arrays.pop("meta").tobytes())
            words = arrays.pop("vocabulary").tobytes().decode()
        except FileNotFoundError as exc:
            raise LifecycleError(f"{path}: model file not found") from exc
        except (OSError, ValueError, KeyError) as exc:
            why = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise LifecycleError(f"{path}: not a valid linear model ({why})") from exc
        vocabulary = words.split("\n") if words else []
        if settings.format != FORMAT or len(vocabulary) != settings.vocabulary_size:
            raise LifecycleError(f"{path}: unsupported linear model (format {settings.format}, "
                                 f"{len(vocabulary)} of {settings.vocabulary_size} terms)")
        return cls(schema, settings, vocabulary, arrays)

    @property
    def needs_text(self) -> bool:
        """False: TF-IDF needs no encoder, so requests are never batched through one."""
        return False

    @property
    def task(self) -> Task:
        return self.schema.task

    # --- features -----------------------------------------------------------------------------

    def tfidf(self, doc: str) -> tuple[list[int], list[float]]:
        """One document's TF-IDF row as (sorted term indices, values), as TfidfVectorizer.transform.

        Plain Python floats: each step is the IEEE operation sklearn's numpy/Cython code does, in the
        same order, so the values are equal bit for bit; `log(tf) + 1` comes from numpy's own log.
        """
        text = self.settings.text
        assert text is not None and self._pattern is not None
        if text.lowercase:
            doc = doc.lower()
        tokens = self._pattern.findall(doc)
        low, high = text.ngram_range
        grams = tokens if low == 1 else []
        if high > 1:
            grams = list(grams)
            for n in range(max(low, 2), min(high, len(tokens)) + 1):
                grams.extend(" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        counts: dict[int, int] = {}
        vocab = self.vocabulary
        for gram in grams:
            j = vocab.get(gram)
            if j is not None:
                counts[j] = counts.get(j, 0) + 1
        idx = sorted(counts)
        tf = [counts[j] for j in idx]
        if text.sublinear_tf:
            table = self._log_tf
            big = [c for c in tf if c >= len(table)]
            more = dict(zip(big, (np.log(np.asarray(big, dtype=np.float64)) + 1.0).tolist())) if big else {}
            values = [table[c] if c < len(table) else more[c] for c in tf]
        else:
            values = [float(c) for c in tf]
        if text.use_idf:
            idf = self._idf
            values = [v * idf[j] for v, j in zip(values, idx)]
        if text.norm == "l2":
            total = 0.0
            for v in values:  # in column order, one by one: sklearn's row norm
                total += v * v
            if total != 0.0:
                root = math.sqrt(total)
                values = [v / root for v in values]
        return idx, values

    def _csr(self, numeric: np.ndarray, categorical: list[list[str]], texts: list[str] | None,
             rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indptr, indices, data) of the feature matrix in the ColumnTransformer's column order."""
        scaled = ((np.where(np.isnan(numeric), self.median, numeric) - self.mean) / self.scale).tolist() \
            if len(self._numeric_at) else None
        numeric_at = self._numeric_at.tolist()
        indices: list[int] = []
        data: list[float] = []
        indptr = [0] * (rows + 1)
        for i in range(rows):
            if texts is not None:
                idx, vals = self.tfidf(texts[i])
                indices += idx
                data += vals
            for (_, levels), col in zip(self._levels, categorical):
                code = levels.get(col[i])
                if code is not None:
                    indices.append(code)
                    data.append(1.0)
            if scaled is not None:
                indices += numeric_at
                data += scaled[i]
            indptr[i + 1] = len(indices)
        return (np.asarray(indptr, dtype=np.int64), np.asarray(indices, dtype=np.int64),
                np.asarray(data, dtype=np.float64))

    def raw(self, numeric: np.ndarray, categorical: list[list[str]], texts: list[str] | None,
            rows: int) -> np.ndarray:
        """The model's output from read values: values (ridge) or (rows, classes) probabilities."""
        indptr, indices, data = self._csr(numeric, categorical, texts, rows)
        scores = np.zeros((rows, self.coef.shape[1]))
        if len(indices):  # one CSR × dense product: gather the weight rows, sum each row's segment
            contrib = self.coef[indices] * data[:, None]
            starts = indptr[:-1]
            filled = indptr[1:] > starts
            scores[filled] = np.add.reduceat(contrib, starts[filled], axis=0)
        scores += self.intercept
        if self.settings.kind == "ridge":
            return scores[:, 0]
        if scores.shape[1] == 1:  # binary: LogisticRegression's expit of the one decision value
            p = 1.0 / (1.0 + np.exp(-scores[:, 0]))
            proba = np.column_stack([1.0 - p, p])
        else:
            proba = _softmax(scores)
        out = np.zeros((rows, len(self.schema.classes)))
        out[:, self.class_index] = proba  # classes the fit never saw keep probability 0
        return out

    def _records(self, raw: np.ndarray, probabilities: bool) -> list[dict[str, Any]]:
        labels, proba = decode_predictions(raw, self.schema)
        if not probabilities or proba is None:
            return [{"prediction": label} for label in labels]
        names = [f"{PROBA_PREFIX}{c}" for c in self.schema.classes]
        return [{"prediction": label, **dict(zip(names, p))} for label, p in zip(labels, proba.tolist())]

    def _missing(self, present: Any) -> None:
        missing = [c for c in self.input_columns if c not in present]
        if missing:
            raise LifecycleError(f"missing input column(s): {', '.join(missing)}")

    # --- entry points ---------------------------------------------------------------------------

    def read_frame(self, frame: pd.DataFrame) -> tuple[np.ndarray, list[list[str]], list[str] | None]:
        """Values as the baseline read them: floats (NaN missing), strings ("" missing).

        Raises:
            LifecycleError: a missing column, or a numeric column that is not numeric.
        """
        self._missing(frame.columns)
        numeric = np.empty((len(frame), len(self.settings.numeric)), dtype=np.float64)
        for j, col in enumerate(self.settings.numeric):
            try:
                numeric[:, j] = pd.to_numeric(frame[col], errors="raise").to_numpy(dtype=np.float64, na_value=np.nan)
            except (ValueError, TypeError) as exc:
                raise LifecycleError(f"column {col!r} must be numeric ({exc})") from exc
        cats = [frame[c].astype("string").fillna("").tolist() for c in self.settings.categorical]
        text = self.settings.text
        texts = frame[text.column].astype("string").fillna("").tolist() if text else None
        return numeric, cats, texts

    def predict(self, frame: pd.DataFrame, probabilities: bool = False) -> list[dict[str, Any]]:
        """One dict per row (the reference path): `prediction`, plus `proba_<class>` when asked."""
        if len(frame) == 0:
            return []
        return self._records(self.raw(*self.read_frame(frame), len(frame)), probabilities)

    def predict_columns(self, columns: Mapping[str, Sequence[Any]], rows: int,
                        probabilities: bool = False) -> list[dict[str, Any]]:
        """Same as `predict`, from JSON column lists of length `rows` (the request path, no pandas).

        Raises:
            LifecycleError: a missing column or a value that is not numeric (the reference path's message).
        """
        if rows == 0:
            return []
        self._missing(columns)
        try:
            numeric = np.empty((rows, len(self.settings.numeric)), dtype=np.float64)
            for j, col in enumerate(self.settings.numeric):
                values = columns[col]
                if any(isinstance(v, (str, bool)) for v in values):
                    raise TypeError(col)  # pandas parses/refuses these its own way: use the reference path
                numeric[:, j] = np.asarray(values, dtype=np.float64)
            cats = [[_text_value(v) for v in columns[c]] for c in self.settings.categorical]
            text = self.settings.text
            texts = [_text_value(v) for v in columns[text.column]] if text else None
        except (TypeError, ValueError, OverflowError):
            return self.predict(pd.DataFrame({c: list(v) for c, v in columns.items()}), probabilities)
        return self._records(self.raw(numeric, cats, texts, rows), probabilities)

    def check_columns(self, columns: Mapping[str, Sequence[Any]], rows: int) -> None:
        """Raise what `predict_columns` would raise for these values (nothing is slow here to skip)."""
        if rows:
            self.read_frame(pd.DataFrame({c: list(columns[c]) for c in self.input_columns if c in columns}))

