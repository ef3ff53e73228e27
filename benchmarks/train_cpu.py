"""The project's train step on a 2-worker local Dask cluster vs single-process XGBoost, same data and params.

Data: synthetic 1M × 28 float features + a binary label (numpy, seeded), written as Parquet parts to a
file lake, the way ingest leaves a dataset version. Both sides use the project's split (id hash), its
per-round evaluation slice, `xgb_params` and a fixed number of rounds (no early stopping), and 2 threads
in all (2 workers × 1 thread vs nthread=2).

Figures (value = project seconds, baseline = single process; harness ratio = baseline / value, so
≥ 0.87 means within the 1.15× goal):
- `train.cpu.boost`: the training step only (`tasks.training.boost`: DaskQuantileDMatrix + train, data
  already in worker memory) vs `QuantileDMatrix` + `xgb.train` on arrays already in memory.
- `train.cpu.fit`: `tasks.training.fit` end to end (preflight, Parquet read on the workers, split,
  schema, matrices, training, holdout scoring) vs the same in one process.
Each is the best of `--repeats` interleaved runs after one warm-up run of each side.

    python -m benchmarks.train_cpu [--rows 1000000] [--rounds 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import record

FEATURES = 28


def write_dataset(root: Path, rows: int, parts: int = 4):
    """Synthetic rows as Parquet parts in a file lake; returns (spec, store, DatasetVersion)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from infra_blocks import ObjectStore
    from lifecycle.records import DatasetVersion
    from lifecycle.spec import parse_spec

    rng = np.random.default_rng(0)
    X = rng.normal(size=(rows, FEATURES)).astype(np.float64)
    signal = X[:, 0] * X[:, 1] + np.sin(X[:, 2]) + 0.5 * X[:, 3] - 0.3 * X[:, 4:8].sum(axis=1)
    y = (signal + rng.normal(scale=0.5, size=rows) > 0).astype(np.int64)
    store = ObjectStore(url=f"file://{root / 'lake'}")
    keys = []
    for i, idx in enumerate(np.array_split(np.arange(rows), parts)):
        key = f"datasets/synthetic/bench/part-{i:05d}.parquet"
        columns = {"id": pa.array(idx.astype(np.int64)), "y": pa.array(y[idx])}
        columns.update({f"f{j}": pa.array(X[idx, j]) for j in range(FEATURES)})
        store.write_bytes(key, b"")
        pq.write_table(pa.table(columns), store.path(key))
        keys.append(key)
    spec = parse_spec({"name": "synthetic", "source": "generated", "id_column": "id", "label_column": "y",
                       "task": "binary", "numeric_features": [f"f{j}" for j in range(FEATURES)]})
    dataset = DatasetVersion(id="bench", dataset="synthetic", source="generated", path="datasets/synthetic/bench",
                             parts=keys, rows=rows, bytes=0, schema={}, spec_hash="bench")
    return spec, store, dataset


def with_rounds(spec, rounds: int):
    return spec.model_copy(update={"train": spec.train.model_copy(
        update={"num_boost_round": rounds, "early_stopping_rounds": None})})


def single_process(spec, store, dataset, rounds: int, threads: int = 2) -> dict[str, float]:
    """The same work in one process: read, split, features, QuantileDMatrix + train, holdout scoring."""
    import pandas as pd
    import pyarrow.parquet as pq
    import xgboost as xgb

    from lifecycle.features import build_schema, encode_labels, feature_matrix
    from tasks.train_data import eval_threshold, holdout_buckets, holdout_threshold
    from tasks.training import holdout_metrics, xgb_params

    t0 = time.perf_counter()
    frame = pd.concat([pq.read_table(store.path(k)).to_pandas() for k in dataset.parts], ignore_index=True)
    buckets = holdout_buckets(frame[spec.id_column], spec.split)
    held = buckets < holdout_threshold(spec.split)
    evaluated = buckets < eval_threshold(spec.split, dataset.rows)
    schema = build_schema(spec, {}, sorted(frame[spec.label_column].astype(str).unique()))
    X, y = feature_matrix(frame, schema), encode_labels(frame[spec.label_column], schema)
    params = {**xgb_params(spec, 2, "cpu"), "nthread": threads}
    t1 = time.perf_counter()
    dtrain = xgb.QuantileDMatrix(X[~held], y[~held], feature_names=schema.feature_names)
    deval = xgb.QuantileDMatrix(X[evaluated], y[evaluated], ref=dtrain, feature_names=schema.feature_names)
    booster = xgb.train(params, dtrain, num_boost_round=rounds, evals=[(deval, "holdout")], verbose_eval=False)
    t2 = time.perf_counter()
    raw = booster.inplace_predict(X[held])
    holdout_metrics(spec.task, y[held], raw)
    return {"fit": time.perf_counter() - t0, "boost": t2 - t1}


def project(spec, store, dataset, compute, rounds: int) -> dict[str, float]:
    """`fit` end to end, then `boost` alone on matrices already persisted on the workers."""
    from tasks import training
    from tasks.train_data import EVAL_COLUMN, HOLDOUT_COLUMN, load_frame, matrix_side

    spec = with_rounds(spec, rounds)
    t0 = time.perf_counter()
    result = training.fit(spec, dataset, store, compute)
    fit_s = time.perf_counter() - t0
    with compute.get_client(check=False) as client, client.as_current():
        ddf = client.persist(load_frame(store, spec, dataset))
        train = client.persist(list(matrix_side(ddf, ~ddf[HOLDOUT_COLUMN], result.schema, spec.label_column, "cpu")))
        evals = client.persist(list(matrix_side(ddf, ddf[EVAL_COLUMN], result.schema, spec.label_column, "cpu")))
        from distributed import wait

        wait([*train, *evals])
        t1 = time.perf_counter()
        training.boost(client, tuple(train), tuple(evals), result.params, rounds, None,
                       result.schema.feature_names, result.schema.feature_types)
        boost_s = time.perf_counter() - t1
    return {"fit": fit_s, "boost": boost_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")

    from infra_blocks import DaskCompute
    from infra_blocks.dask_compute import close_local_clusters

    compute = DaskCompute(mode="local", n_workers=2, threads_per_worker=1)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        spec, store, dataset = write_dataset(Path(tmp), args.rows)
        spec = with_rounds(spec, args.rounds)
        try:
            single_process(spec, store, dataset, 5)  # warm-ups: imports, worker start, first-call costs
            project(spec, store, dataset, compute, 5)
            bare, ours = [], []
            for _ in range(args.repeats):  # interleaved: a burst of load elsewhere hits both sides alike
                bare.append(single_process(spec, store, dataset, args.rounds))
                ours.append(project(spec, store, dataset, compute, args.rounds))
        finally:
            close_local_clusters()
    size = f"{args.rows // 1000}k×{FEATURES}, {args.rounds} rounds"
    for step, what in (("boost", "DMatrix + train"), ("fit", "read + split + features + train + score")):
        mine, base = min(r[step] for r in ours), min(r[step] for r in bare)
        record(f"train.cpu.{step} ({size}, 2 workers × 1 thread)", mine, "s",
               baseline=f"single-process xgboost, nthread=2 ({what})", baseline_value=base,
               higher_is_better=False, goal="ratio ≥ 0.87 (≤ 1.15× bare)")
        print(f"  {step}: project {mine:.2f}s vs single process {base:.2f}s → {mine / base:.2f}× "
              f"(runs: {[round(r[step], 2) for r in ours]} vs {[round(r[step], 2) for r in bare]})")


if __name__ == "__main__":
    main()
