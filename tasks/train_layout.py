"""How a training run uses the cluster, chosen from the data: one worker with every thread, or all workers.

Why this shape:
- A 63.7k-row, 58-class version with 384-d embeddings trained in 1003 s on a 2-worker × 1-thread
  cluster against 447 s for bare single-process xgboost (nthread 2) on the same machine: each of the
  58 trees per round all-reduced its histograms (388 features × bins) between the workers, and each
  worker built them on one thread. Splitting data that fits one worker buys nothing but that traffic.
- So the layout is picked from the version's rows, width and class count and what the preflight found:
  data that fits one worker's memory (with room for the DMatrix and its copy) is trained by ONE task on
  one worker with every thread of that worker's host (`nthread`), a plain `QuantileDMatrix` and an
  in-process evaluation set, so no all-reduce and no per-round evaluation through Dask. Larger data,
  or a cluster of several hosts whose cores the data can use, keeps `xgboost.dask` across all workers.
  On GPUs the single layout is one GPU; several GPU workers are used once the data is large.
- The choice and its reason are tagged on the MLflow run (`lifecycle.layout.*`); `DaskCompute.train_layout`
  forces either layout (tests run the distributed path on a local cluster this way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from infra_blocks.compute_report import ComputeReport
from lifecycle.errors import LifecycleError
from tasks.train_progress import reported_rounds, round_reporter

GiB = 2**30
# Bytes one training worker holds per float32 feature value: the arrays, their concatenated copy, the
# quantised DMatrix and slack for the evaluation slice and the gradient buffers.
BYTES_PER_VALUE = 4 * 3
UNKNOWN_MEMORY = 8 * GiB  # a worker without a memory limit: assume this much is safe
MULTI_HOST_SINGLE_MAX_ROWS = 200_000  # other hosts' cores pay for the all-reduce only above this
GPU_SINGLE_MAX_ROWS = 2_000_000  # one GPU trains this many rows faster than a multi-GPU all-reduce
GPU_MEMORY_SHARE = 0.25  # of one GPU's memory the single layout may fill


class WorkerLostError(LifecycleError):
    """The worker training the single layout left the cluster (killed, out of memory): the train task
    retries from a clean start, as it does when xgboost.dask loses a worker."""

    transient = True


@dataclass(frozen=True)
class Layout:
    """Where and how `boost` runs (see the module doc)."""

    kind: Literal["single", "distributed"]
    workers: int
    nthread: int
    worker: str | None
    reason: str

    @property
    def dmatrix(self) -> str:
        return "QuantileDMatrix on one worker" if self.kind == "single" else "DaskQuantileDMatrix on every worker"

    @property
    def evaluation(self) -> str:
        return "in process, every round" if self.kind == "single" else "through Dask, every round"

    def tags(self, prefix: str = "lifecycle.layout.") -> dict[str, str]:
        values = {"kind": self.kind, "workers": self.workers, "nthread": self.nthread, "worker": self.worker or "",
                  "dmatrix": self.dmatrix, "evaluation": self.evaluation, "reason": self.reason}
        return {f"{prefix}{k}": str(v)[:500] for k, v in values.items()}


def host_of(address: str) -> str:
    """The host part of a worker address (tcp://10.0.0.5:40123 → 10.0.0.5)."""
    rest = address.split("://", 1)[-1]
    return rest.rsplit(":", 1)[0] if ":" in rest else rest


def choose_layout(rows: int, width: int, classes: int, report: ComputeReport, device: str = "cpu",
                  forced: Literal["auto", "single", "distributed"] = "auto") -> Layout:
    """Pick the layout for `rows` × `width` training rows and `classes` classes on the reported workers.

    Pure (unit-tested on made-up reports). The single worker is the one with the most memory on the
    host with the most threads; its `nthread` is every thread the workers of that host were given.
    """
    workers = sorted(report.workers, key=lambda w: w.address)
    hosts: dict[str, list[Any]] = {}
    for w in workers:
        hosts.setdefault(host_of(w.address), []).append(w)
    host, on_host = max(hosts.items(), key=lambda kv: (sum(w.threads for w in kv[1]), -len(kv[0])))
    pick = max(on_host, key=lambda w: w.memory_limit)
    nthread = max(1, sum(w.threads for w in on_host)) if device != "cuda" else max(1, pick.threads)
    need = rows * max(width, 1) * BYTES_PER_VALUE
    shape = f"{rows} train rows × {width} features, {classes or 1} output(s) per round"

    def single(reason: str) -> Layout:
        return Layout("single", 1, nthread, pick.address, f"{shape}: {reason}")

    def spread(reason: str) -> Layout:
        return Layout("distributed", len(workers), max((w.threads for w in workers), default=1), None,
                      f"{shape}: {reason}")

    if forced == "single":
        return single("forced by DaskCompute.train_layout=single")
    if forced == "distributed":
        return spread("forced by DaskCompute.train_layout=distributed")
    if len(workers) == 1:
        return single("one worker: plain xgboost on it, no evaluation through Dask")
    if device == "cuda":
        gpu_memory = pick.gpu_memory[0] if pick.gpu_memory else 0
        if need <= gpu_memory * GPU_MEMORY_SHARE and rows <= GPU_SINGLE_MAX_ROWS:
            return single(f"fits one GPU ({need / GiB:.2f} of {gpu_memory / GiB:.0f} GiB): no all-reduce")
        return spread(f"larger than one GPU takes alone: {len(workers)} GPU workers")
    memory = pick.memory_limit or UNKNOWN_MEMORY
    if need > memory:
        return spread(f"needs ~{need / GiB:.2f} GiB, more than one worker's {memory / GiB:.2f} GiB")
    if len(hosts) > 1 and rows > MULTI_HOST_SINGLE_MAX_ROWS:
        return spread(f"{len(hosts)} hosts and more than {MULTI_HOST_SINGLE_MAX_ROWS} rows: their cores outweigh "
                      "the all-reduce")
    return single(f"fits one worker (~{need / GiB:.2f} of {memory / GiB:.2f} GiB): one worker × {nthread} threads "
                  f"on {host}, no all-reduce")


def _concat(parts: list[Any]) -> Any:
    """Blocks of one side as one array (cupy blocks stay on the GPU)."""
    import numpy as np

    if parts and type(parts[0]).__module__.startswith("cupy"):
        import cupy

        return cupy.concatenate(parts)
    return np.concatenate(parts) if parts else np.empty((0,))


def train_on_worker(X_parts: list[Any], y_parts: list[Any], eval_parts: tuple[list[Any], list[Any]] | None,
                    params: dict[str, Any], num_boost_round: int, early_stopping_rounds: int | None,
                    feature_names: list[str] | None, feature_types: list[str] | None) -> tuple[Any, dict]:
    """Runs ON the chosen worker: plain xgboost with every thread, rounds reported as worker events.

    Every thread needs OpenMP's limit raised here: a nanny starts its worker with `OMP_NUM_THREADS=1`
    (distributed's `nanny.pre-spawn-environ`) and xgboost caps `nthread` at `omp_get_max_threads()`,
    so without it the "one worker with every thread" trained on one thread (1.58× bare xgboost on the
    wide multiclass benchmark with 2 threads asked for).
    """
    import xgboost as xgb
    from threadpoolctl import threadpool_limits

    kw = dict(feature_names=feature_names, feature_types=feature_types, enable_categorical=True,
              nthread=params.get("nthread"))
    with threadpool_limits(limits=params.get("nthread") or None, user_api="openmp"):
        dtrain = xgb.QuantileDMatrix(_concat(X_parts), _concat(y_parts), **kw)
        watch = []
        if eval_parts is not None:
            watch = [(xgb.QuantileDMatrix(_concat(eval_parts[0]), _concat(eval_parts[1]), ref=dtrain, **kw),
                      "holdout")]
        log: dict[str, dict[str, list[float]]] = {}
        booster = xgb.train(params, dtrain, num_boost_round=num_boost_round, evals=watch, evals_result=log,
                            early_stopping_rounds=early_stopping_rounds if watch else None, verbose_eval=False,
                            callbacks=[round_reporter(num_boost_round)])
    history = {m: [float(v) for v in vals] for m, vals in log.get("holdout", {}).items()}
    return booster, history


def _blocks(client: Any, array: Any) -> list[Any]:
    """Futures of a persisted dask array's row blocks, in order."""
    return client.compute(list(array.to_delayed().ravel()))


def boost_single(client: Any, layout: Layout, train: tuple[Any, Any], evals: tuple[Any, Any] | None,
                 params: dict[str, Any], num_boost_round: int, early_stopping_rounds: int | None = None,
                 feature_names: list[str] | None = None, feature_types: list[str] | None = None) -> tuple[Any, dict]:
    """The single layout of `training.boost`: the blocks move to one worker, one task trains there.

    The task is pinned to that worker (its threads are what `nthread` counts). Dask would wait forever
    for a pinned worker that died, so the wait checks every second that it is still there.

    Returns:
        (booster, per-round history of the evaluation set: metric -> values), as `boost` does.

    Raises:
        WorkerLostError: the worker left the cluster while training (transient: the task retries).
    """
    params = {**params, "nthread": layout.nthread}
    X, y = (_blocks(client, a) for a in train)
    watched = tuple(_blocks(client, a) for a in evals) if evals is not None else None
    with reported_rounds(client):
        future = client.submit(train_on_worker, X, y, watched, params, num_boost_round, early_stopping_rounds,
                               feature_names, feature_types, workers=[layout.worker] if layout.worker else None,
                               allow_other_workers=layout.worker is None, pure=False)
        while True:
            try:
                booster, history = future.result(timeout=1.0)
                return booster, history
            except TimeoutError:
                if layout.worker and layout.worker not in client.scheduler_info(n_workers=-1)["workers"]:
                    future.cancel()
                    raise WorkerLostError(f"training worker {layout.worker} left the cluster while training "
                                          f"{num_boost_round} rounds") from None
