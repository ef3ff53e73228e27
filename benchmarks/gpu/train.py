"""GPU: the project's train step vs bare single-GPU XGBoost on 10M x 28 rows generated on the GPU.

Prints, from one process on one GPU:
  bare      xgboost.QuantileDMatrix + xgboost.train in this process (the baseline)
  project   tasks.training.boost on a one-worker LocalCUDACluster built by the project's DaskCompute
            (mode=cuda), protocol tcp and then ucx: same data, same params (tasks.training.xgb_params),
            same rounds, same evaluation set; the ratio project / bare is the figure (goal <= 1.15x)
  naive     the same step evaluating the whole training set every round (the 2.05x STACK-NOTES case)
  gather    10M predictions from the worker to the client, as host arrays (what fit does) and as device
            arrays, per protocol
Both sides generate their data with the same function and seed on the same GPU (checksums printed),
both are warmed up first (CUDA context, kernels), and each timing is the median of --repeats runs.

Nothing is installed here: see benchmarks/gpu/run.sh for the wheels it needs on a GPU machine.

    python benchmarks/gpu/train.py [--rows 10000000] [--rounds 200] [--depth 8] [--protocols tcp,ucx]
                                   [--repeats 3] [--record] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FEATURES = 28
EVAL_ROWS = 200_000  # the project's per-round evaluation cap (tasks.train_data.EVAL_ROWS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="See the module docstring.")
    parser.add_argument("--rows", type=int, default=10_000_000, help="Training rows (default 10M).")
    parser.add_argument("--rounds", type=int, default=200, help="Boosting rounds, no early stopping.")
    parser.add_argument("--depth", type=int, default=8, help="max_depth.")
    parser.add_argument("--protocols", default="tcp,ucx", help="Comma list of tcp, ucx, ucxx.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per figure (median reported).")
    parser.add_argument("--device", default="0", help="CUDA_VISIBLE_DEVICES for the worker.")
    parser.add_argument("--rmm-pool", default=None, help="rmm_pool_size for the worker, e.g. 16GB.")
    parser.add_argument("--no-naive", action="store_true", help="Skip the naive (eval on train) run.")
    parser.add_argument("--record", action="store_true", help="Append figures to benchmarks/results.jsonl.")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="Folder for summary.json ($OUT).")
    return parser.parse_args(argv)


# --- data: the same function on both sides ------------------------------------------------------------

def make_features(rows: int, seed: int):
    """(rows, 28) float32 standard normals on the current GPU."""
    import cupy

    return cupy.random.default_rng(seed).standard_normal((rows, FEATURES), dtype=cupy.float32)


def make_labels(X, seed: int):
    """A binary label with interactions and noise, so trees of depth 8 have work to do."""
    import cupy

    noise = cupy.random.default_rng(seed + 7).standard_normal(X.shape[0], dtype=cupy.float32)
    signal = X[:, 0] * X[:, 1] + cupy.sin(X[:, 2]) + 0.5 * X[:, 3] - 0.3 * X[:, 4:8].sum(axis=1) + 0.5 * noise
    return (signal > 0).astype(cupy.float32)


def checksum(X, y) -> str:
    return f"{float(X.sum(dtype='float64')):.6e}/{float(y.sum()):.0f}"


def params_for(depth: int) -> dict:
    """The project's xgboost parameters for a binary task on cuda (tasks.training.xgb_params)."""
    from lifecycle.spec import parse_spec
    from tasks.training import xgb_params

    spec = parse_spec({"name": "gpu-bench", "source": "generated", "id_column": "id", "label_column": "y",
                       "task": "binary", "numeric_features": [f"f{i}" for i in range(FEATURES)],
                       "train": {"max_depth": depth, "early_stopping_rounds": None}})
    params = xgb_params(spec, 2, "cuda")
    params["eval_metric"] = params["eval_metric"][-1:]  # logloss only: one metric per round, both sides
    return params


# --- bare -----------------------------------------------------------------------------------------------

def bare_train(X, y, Xe, ye, params: dict, rounds: int, evals: bool = True) -> float:
    import cupy
    import xgboost as xgb

    t0 = time.perf_counter()
    dtrain = xgb.QuantileDMatrix(X, y)
    watch = [(xgb.QuantileDMatrix(Xe, ye, ref=dtrain), "holdout")] if evals else []
    booster = xgb.train(params, dtrain, num_boost_round=rounds, evals=watch, verbose_eval=False)
    cupy.cuda.Device().synchronize()
    seconds = time.perf_counter() - t0
    assert booster.num_boosted_rounds() == rounds
    return seconds


def run_bare(args, params: dict) -> dict:
    import cupy

    X, Xe = make_features(args.rows, 0), make_features(EVAL_ROWS, 1)
    y, ye = make_labels(X, 0), make_labels(Xe, 1)
    sums = checksum(X, y)
    bare_train(Xe, ye, Xe[:10_000], ye[:10_000], params, 5)  # warm-up: context, kernels
    with_eval = [bare_train(X, y, Xe, ye, params, args.rounds) for _ in range(args.repeats)]
    no_eval = [bare_train(X, y, Xe, ye, params, args.rounds, evals=False) for _ in range(args.repeats)]
    del X, y, Xe, ye
    cupy.get_default_memory_pool().free_all_blocks()
    return {"checksum": sums, "seconds": with_eval, "no_eval_seconds": no_eval}


# --- the project's step -----------------------------------------------------------------------------------

def worker_arrays(client, rows: int, seed: int):
    """(X, y) as dask arrays with one cupy chunk each, generated on the worker (nothing crosses the client)."""
    import cupy
    import dask
    import dask.array as da
    import numpy as np

    X = da.from_delayed(dask.delayed(make_features)(rows, seed), shape=(rows, FEATURES), dtype=np.float32,
                        meta=cupy.empty((0, FEATURES), dtype=cupy.float32))
    y = X.map_blocks(make_labels, seed, drop_axis=1, dtype=np.float32, meta=cupy.empty((0,), dtype=cupy.float32))
    return client.persist([X, y])


def run_project(args, params: dict, protocol: str) -> dict:
    import dask
    import xgboost as xgb
    import xgboost.dask  # noqa: F401
    from distributed import wait

    from infra_blocks import DaskCompute
    from infra_blocks.dask_compute import close_local_clusters
    from tasks.train_data import host_arrays
    from tasks.training import boost

    compute = DaskCompute(mode="cuda", protocol=protocol, n_workers=1, cuda_visible_devices=args.device,
                          rmm_pool_size=args.rmm_pool, enable_infiniband=False, enable_nvlink=False)
    try:
        started = time.perf_counter()
        with compute.get_client(check=False) as client, client.as_current():
            report = compute.preflight(client)
            cluster_s = time.perf_counter() - started
            (X, y), (Xe, ye) = worker_arrays(client, args.rows, 0), worker_arrays(client, EVAL_ROWS, 1)
            wait([X, y, Xe, ye])
            sums = client.compute(dask.delayed(checksum)(X, y), sync=True)
            boost(client, (Xe, ye), None, params, 5)  # warm-up: xgboost's kernels in the worker process
            step = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                booster, history = boost(client, (X, y), (Xe, ye), params, args.rounds)
                step.append(time.perf_counter() - t0)
            assert booster.num_boosted_rounds() == args.rounds and len(history["logloss"]) == args.rounds
            naive = []
            if not args.no_naive:
                t0 = time.perf_counter()
                boost(client, (X, y), (X, y), params, args.rounds)
                naive.append(time.perf_counter() - t0)
            predicted = client.persist(xgb.dask.inplace_predict(client, booster, X))
            wait(predicted)
            t0 = time.perf_counter()
            client.compute(host_arrays(predicted)[0], sync=True)
            gather_host = time.perf_counter() - t0
            t0 = time.perf_counter()
            client.compute(predicted, sync=True)
            gather_device = time.perf_counter() - t0
    finally:
        close_local_clusters()
    return {"protocol": protocol, "checksum": sums, "seconds": step, "naive_seconds": naive,
            "gather_host_seconds": gather_host, "gather_device_seconds": gather_device,
            "cluster_start_seconds": cluster_s, "compute": report.summary(),
            "gpu": report.workers[0].gpus[0] if report.workers and report.workers[0].gpus else "unknown GPU"}


# --- report ---------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The workers are new processes: they find the project (tasks.*, infra_blocks.*) through PYTHONPATH.
    sys.path.insert(0, str(REPO))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - ImportError or no CUDA device
        print(f"benchmarks/gpu/train.py needs a CUDA GPU with cupy: {exc}", file=sys.stderr)
        return 2
    import importlib.util

    import xgboost as xgb

    params = params_for(args.depth)
    print(f"xgboost {xgb.__version__}, {args.rows:,} x {FEATURES}, {args.rounds} rounds, depth {args.depth}, "
          f"eval set {EVAL_ROWS:,} rows, median of {args.repeats}; params {params}", flush=True)
    bare = run_bare(args, params)
    base, base_no_eval = statistics.median(bare["seconds"]), statistics.median(bare["no_eval_seconds"])
    print(f"bare                 {base:7.3f} s  ({1000 * base / args.rounds:.1f} ms/round)  "
          f"no evals {base_no_eval:.3f} s  checksum {bare['checksum']}", flush=True)
    results = []
    for protocol in [p.strip() for p in args.protocols.split(",") if p.strip()]:
        if protocol != "tcp" and importlib.util.find_spec("distributed_ucxx") is None:
            print(f"project {protocol:<4}         skipped: distributed-ucxx is not installed")
            continue
        res = run_project(args, params, protocol)
        mine = statistics.median(res["seconds"])
        res.update(ratio=mine / base, ratio_no_eval=mine / base_no_eval)
        results.append(res)
        naive = f"  naive {res['naive_seconds'][0]:.3f} s ({res['naive_seconds'][0] / base:.2f}x)" \
            if res["naive_seconds"] else ""
        print(f"project {protocol:<4}         {mine:7.3f} s  ({1000 * mine / args.rounds:.1f} ms/round)  "
              f"{res['ratio']:.3f}x bare (goal <= 1.15x), {res['ratio_no_eval']:.3f}x bare without evals{naive}",
              flush=True)
        print(f"  gather 10M predictions: host {res['gather_host_seconds']:.3f} s, device "
              f"{res['gather_device_seconds']:.3f} s; data checksum {res['checksum']} "
              f"({'same' if res['checksum'] == bare['checksum'] else 'DIFFERENT'} as bare); {res['compute']}",
              flush=True)
    card = results[0]["gpu"] if results else "GPU"
    summary = {"card": card, "rows": args.rows, "rounds": args.rounds, "depth": args.depth, "bare": bare,
               "project": results, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))
    if args.record:
        record_figures(summary, base)
    return 0


def record_figures(summary: dict, base: float) -> None:
    from benchmarks.harness import record

    os.environ["LIFECYCLE_BENCH_GPU"] = summary["card"]
    size = f"{summary['rows'] // 1_000_000}Mx{FEATURES}, {summary['rounds']} rounds, depth {summary['depth']}"
    record(f"train.gpu.bare ({size})", base, "s", higher_is_better=False)
    for res in summary["project"]:
        p = res["protocol"]
        record(f"train.gpu.step.{p} ({size})", statistics.median(res["seconds"]), "s",
               baseline="bare single-GPU xgboost, same evals", baseline_value=base, higher_is_better=False,
               goal="ratio >= 0.87 (<= 1.15x bare)")
        if res["naive_seconds"]:
            record(f"train.gpu.naive_eval_on_train.{p} ({size})", res["naive_seconds"][0], "s",
                   baseline="bare single-GPU xgboost", baseline_value=base, higher_is_better=False)
        record(f"train.gpu.gather_predictions_host.{p} (10M float32)", res["gather_host_seconds"], "s",
               higher_is_better=False)
        record(f"train.gpu.gather_predictions_device.{p} (10M float32)", res["gather_device_seconds"], "s",
               higher_is_better=False)


if __name__ == "__main__":
    sys.exit(main())
