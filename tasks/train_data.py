"""TRAIN stage data: the store's Parquet parts → feature matrices in Dask worker memory (host or GPU).

Why this shape:
- Data goes straight from the store into worker memory (`dd.read_parquet` runs on the workers); the
  client only ever holds the holdout predictions, so the dataset size is bounded by the cluster.
- The holdout is a hash of the row id (not a random draw), so a row is always on the same side:
  the register stage re-creates the identical holdout to compare a challenger with the champion.
- The per-round evaluation set is a further id-hash slice of the holdout capped at `EVAL_ROWS`, so
  early stopping and per-round metrics stay cheap on a 10M-row dataset; final metrics use the
  whole holdout.
- On `device=cuda` each partition's matrix is built on its worker's host (pandas: the same category
  codes and hashes serving and register compute) and moved to that worker's GPU in the same task
  (`cupy.asarray`), so the matrices are cupy-backed and nothing passes through the client. The dask
  meta stays numpy: the client needs neither cupy nor a GPU. cupy is imported on the workers only.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import pandas as pd

from infra_blocks import ObjectStore
from lifecycle.errors import LifecycleError
from lifecycle.features import EMBEDDING_PREFIX, FeatureSchema, encode_labels, feature_matrix
from lifecycle.records import DatasetVersion, EmbeddingSet
from lifecycle.spec import DatasetSpec, SplitConfig

HASH_BUCKETS = 10_000
HOLDOUT_COLUMN = "__holdout"
EVAL_COLUMN = "__eval"
EMBEDDING_COLUMN = "__embedding"
# Rows of the holdout evaluated every boosting round (early stopping, per-round metrics). Evaluating
# 2M holdout rows per round through every worker is most of the orchestration overhead on a GPU.
EVAL_ROWS = 200_000
GPU_PACKAGES = {"cupy": "cupy-cuda13x (or cupy-cuda12x)"}


def holdout_buckets(ids: pd.Series, split: SplitConfig) -> np.ndarray:
    """A salted hash bucket in [0, HASH_BUCKETS) per id; ids are turned into text first, so an int id
    and its string form land in the same bucket."""
    keys = pd.Series(ids.astype(str).to_numpy(dtype=object) + split.salt, dtype=object)
    return pd.util.hash_pandas_object(keys, index=False).to_numpy() % HASH_BUCKETS


def holdout_threshold(split: SplitConfig) -> int:
    return int(round(split.holdout_fraction * HASH_BUCKETS))


def holdout_mask(ids: pd.Series, split: SplitConfig) -> np.ndarray:
    """True for holdout rows: membership depends on nothing but the id (and the salt)."""
    return holdout_buckets(ids, split) < holdout_threshold(split)


def eval_threshold(split: SplitConfig, expected_rows: int, eval_rows: int = EVAL_ROWS) -> int:
    """Bucket bound of the per-round evaluation slice: the whole holdout unless it exceeds `eval_rows`.

    The slice is nested in the holdout (same hash, lower bound), so it is a uniform sample of it.
    """
    bound = holdout_threshold(split)
    expected_holdout = expected_rows * split.holdout_fraction
    if expected_holdout <= eval_rows:
        return bound
    return max(1, int(np.ceil(bound * eval_rows / expected_holdout)))


def input_columns(spec: DatasetSpec) -> list[str]:
    """Raw columns a request must carry (the text column only when the model embeds it)."""
    cols = [*spec.numeric_features, *spec.categorical_features]
    return cols + ([spec.text_column] if spec.train.use_text_embeddings and spec.text_column else [])


def _vectors(part: pd.DataFrame, id_column: str) -> pd.DataFrame:
    """An embedding part as (id, vector) whatever its layout: a list `vector` column or `emb_<i>` columns."""
    ids = part[id_column] if id_column in part.columns else part["id"]
    if "vector" in part.columns:
        vectors = [np.asarray(v, dtype=np.float32) for v in part["vector"]]
    else:
        cols = sorted((c for c in part.columns if c.startswith(EMBEDDING_PREFIX)),
                      key=lambda c: int(c[len(EMBEDDING_PREFIX):]))
        vectors = list(part[cols].to_numpy(dtype=np.float32))
    return pd.DataFrame({id_column: ids.to_numpy(), EMBEDDING_COLUMN: pd.Series(vectors, dtype=object).to_numpy()},
                        index=part.index)


def embedding_frame(store: ObjectStore, embeddings: EmbeddingSet, id_column: str, id_dtype: Any) -> Any:
    """The embedding set as a lazy dask frame of (id, vector), ids cast to the dataset's id type."""
    import dask.dataframe as dd

    raw = dd.read_parquet([store.uri(k) for k in embeddings.parts], storage_options=store.storage_options())
    meta = pd.DataFrame({id_column: pd.Series(dtype=id_dtype), EMBEDDING_COLUMN: pd.Series(dtype=object)})
    return raw.map_partitions(lambda p: _vectors(p, id_column).astype({id_column: id_dtype}), meta=meta)


def _split_flags(ids: pd.Series, split: SplitConfig, eval_bound: int) -> pd.DataFrame:
    buckets = holdout_buckets(ids, split)
    return pd.DataFrame({HOLDOUT_COLUMN: buckets < holdout_threshold(split), EVAL_COLUMN: buckets < eval_bound},
                        index=ids.index)


def train_parts(store: ObjectStore, spec: DatasetSpec, dataset: DatasetVersion) -> tuple[list[str], int]:
    """(files, rows) training reads: the version's every file, or those in `train.window` (time travel to the
    version's own commits, so the same version always gives the same rows). Model, baseline and the
    champion's holdout all read these, so they are measured on the same rows."""
    window = spec.train.window
    if window is None:
        return list(dataset.parts), dataset.rows
    from tasks.lake import table_state

    state = table_state(store, dataset.dataset, dataset.table_version)
    if state is None:
        raise LifecycleError(f"{dataset.dataset}: no Delta table for train.window (dataset version {dataset.id})")
    keys = state.window(window.commits, window.days)
    counts = dict(zip(state.keys(), state.files))
    return keys, sum(state.counts.get(counts[k], 0) for k in keys)


def load_frame(store: ObjectStore, spec: DatasetSpec, dataset: DatasetVersion,
               embeddings: EmbeddingSet | None = None, eval_rows: int = EVAL_ROWS) -> Any:
    """The version as a lazy dask DataFrame: ids, label, inputs, holdout and eval flags, optional vectors."""
    import dask.dataframe as dd

    cols = list(dict.fromkeys([spec.id_column, spec.label_column, *input_columns(spec)]))
    parts, rows = train_parts(store, spec, dataset)
    ddf = dd.read_parquet([store.uri(k) for k in parts], columns=cols, storage_options=store.storage_options())
    ddf = ddf.dropna(subset=[spec.label_column])
    split, bound = spec.split, eval_threshold(spec.split, rows, eval_rows)
    meta = pd.DataFrame({HOLDOUT_COLUMN: pd.Series(dtype=bool), EVAL_COLUMN: pd.Series(dtype=bool)})
    flags = ddf[spec.id_column].map_partitions(_split_flags, split, bound, meta=meta)
    ddf = ddf.assign(**{HOLDOUT_COLUMN: flags[HOLDOUT_COLUMN], EVAL_COLUMN: flags[EVAL_COLUMN]})
    if embeddings is not None and spec.train.use_text_embeddings:
        vectors = embedding_frame(store, embeddings, spec.id_column, ddf[spec.id_column].dtype)
        ddf = ddf.merge(vectors, on=spec.id_column, how="left")
    return ddf


def load_holdout(store: ObjectStore, spec: DatasetSpec, dataset: DatasetVersion) -> pd.DataFrame:
    """The holdout rows as pandas, split exactly as in training (register scores a champion on them)."""
    import pyarrow.parquet as pq

    cols = list(dict.fromkeys([spec.id_column, spec.label_column, *input_columns(spec)]))
    pafs = store.pyarrow_filesystem()
    frames = []
    for key in train_parts(store, spec, dataset)[0]:
        part = pq.read_table(store.path(key), filesystem=pafs, columns=cols).to_pandas()
        part = part[part[spec.label_column].notna()]
        frames.append(part[holdout_mask(part[spec.id_column], spec.split)])
    return pd.concat(frames, ignore_index=True)


# --- host / GPU partitions ----------------------------------------------------------------------------

def gpu_module(name: str) -> Any:
    """Import a GPU library on the worker that needs it, or fail in one line naming the package."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise LifecycleError(f"device=cuda needs {name} on the Dask workers "
                             f"(pip install {GPU_PACKAGES.get(name, name)}): {exc}") from exc


def to_device(array: np.ndarray, device: str) -> Any:
    """A partition's array on the worker's GPU (cupy) for device=cuda; the same array on cpu."""
    if device != "cuda":
        return array
    return gpu_module("cupy").asarray(array)


def to_host(array: Any) -> np.ndarray:
    """A numpy copy of a cupy array (`.get()`), or the numpy array itself: runs on the worker before a
    result is gathered, so the client never receives device memory."""
    if isinstance(array, np.ndarray):
        return array
    get = getattr(array, "get", None)
    return np.asarray(get() if callable(get) else array)


def partition_matrix(part: pd.DataFrame, schema: FeatureSchema, device: str = "cpu") -> Any:
    """Features of one partition (tabular + optional embeddings) as float32, on `device`."""
    emb = None
    if schema.embedding_dim:
        vectors = part[EMBEDDING_COLUMN]
        if vectors.isna().any():
            raise LifecycleError(f"embedding set lacks vectors for {int(vectors.isna().sum())} row(s)")
        emb = np.stack(vectors.to_numpy()).astype(np.float32) if len(part) else np.empty((0, schema.embedding_dim))
    return to_device(feature_matrix(part, schema, emb), device)


def partition_labels(labels: pd.Series, schema: FeatureSchema, device: str = "cpu") -> Any:
    return to_device(encode_labels(labels, schema), device)


def matrix_side(ddf: Any, rows: Any, schema: FeatureSchema, label_column: str, device: str) -> tuple[Any, Any]:
    """(X, y) dask arrays of the selected rows, built partition by partition on the workers."""
    part = ddf[rows]
    n_feat = len(schema.feature_names)
    X = part.map_partitions(partition_matrix, schema, device, meta=np.empty((0, n_feat), np.float32))
    y = part[label_column].map_partitions(partition_labels, schema, device, meta=np.empty((0,), np.float32))
    return X, y


def host_arrays(*arrays: Any) -> list[Any]:
    """Dask arrays whose blocks are copied to host memory on the workers (identity for numpy blocks)."""
    return [a.map_blocks(to_host, dtype=a.dtype, meta=np.empty((0,) * a.ndim, a.dtype)) for a in arrays]
