"""DaskCompute: where embedding and training run.

`local` starts a multi-process LocalCluster on this machine, `cuda` a dask-cuda LocalCUDACluster
(one worker per GPU, UCX/InfiniBand/NVLink as configured), `address` connects to a running scheduler,
and `cluster_class` builds any cluster manager (dask-kubernetes, dask-jobqueue) from a dotted path.
GPU modules are imported only inside `get_client()` on the machine that uses them.

Every client is checked by `preflight()` before a stage uses it: what the workers actually have
(threads, memory, GPUs, UCX transports) is asked of the workers themselves and compared with what the
block asks for, so "mode=cuda but the workers see no GPU" fails at once in one line instead of as a
CUDA error deep inside xgboost half-way through a run.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from prefect.blocks.core import Block
from pydantic import Field

from infra_blocks.compute_report import (
    INFINIBAND_TRANSPORTS,
    NVLINK_TRANSPORT,
    UCX_PROTOCOLS,
    ComputeReport,
    WorkerResources,
    probe_worker,
)
from lifecycle.errors import LifecycleError

# Clusters this process started, by configuration, so that stages in one run share one cluster
# instead of paying its start-up (workers, model loads) per stage. Closed at interpreter exit.
_CLUSTERS: dict[str, Any] = {}
_LOCK = threading.Lock()


def _close_clusters() -> None:
    for cluster in list(_CLUSTERS.values()):
        try:
            cluster.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
    _CLUSTERS.clear()


def resolve_class(dotted: str) -> type:
    """Import `package.module.Class` at run time (GPU/cloud code stays unimported elsewhere)."""
    module, _, name = dotted.rpartition(".")
    if not module:
        raise LifecycleError(f"cluster_class {dotted!r}: expected a dotted path like dask_cuda.LocalCUDACluster")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise LifecycleError(f"cluster_class {dotted!r}: cannot import ({exc})") from exc


class DaskCompute(Block):
    """A Dask compute target: local processes, local GPUs, a remote scheduler or a cluster manager.

    Attributes:
        mode: `local`, `cuda`, `address` or `cluster_class`.
        n_workers: Workers to start (local: processes; cuda: None = one per visible GPU).
        threads_per_worker: Threads per worker process.
        memory_limit: Per-worker memory limit, e.g. "4GiB" or "auto".
        address: Scheduler address for `address` mode, e.g. tcp://10.0.0.5:8786 or ucx://….
        protocol: Comms protocol for `cuda` mode: tcp, ucx or ucxx.
        enable_infiniband: Use InfiniBand transports (UCX) in `cuda` mode.
        enable_nvlink: Use NVLink transports (UCX) in `cuda` mode.
        rmm_pool_size: RMM pool per GPU worker, e.g. "24GB"; None for no pool.
        cuda_visible_devices: GPUs to use in `cuda` mode, e.g. "0,1"; None for all.
        cluster_class: Dotted path of a cluster manager class for `cluster_class` mode.
        cluster_kwargs: Keyword arguments for that class.
        device: Where model code runs: `auto` picks cuda for GPU modes, cpu otherwise.
        train_layout: How training uses the workers: `auto` chooses from the data's size, width and classes.
    """

    _block_type_name = "Lifecycle Dask Compute"
    _block_type_slug = "lifecycle-dask-compute"
    _description = "Dask compute target for embedding and training: local, CUDA, remote scheduler or cluster class."

    mode: Literal["local", "cuda", "address", "cluster_class"] = Field("local", description="How to get a cluster.")
    n_workers: int | None = Field(2, ge=1, description="Worker processes (cuda: None = one per GPU).")
    threads_per_worker: int = Field(1, ge=1, description="Threads per worker.")
    memory_limit: str = Field("auto", description="Memory limit per worker.")
    address: str | None = Field(None, description="Scheduler address for mode=address.")
    protocol: Literal["tcp", "ucx", "ucxx"] = Field("tcp", description="Comms protocol (cuda mode).")
    enable_infiniband: bool = Field(False, description="UCX over InfiniBand (cuda mode).")
    enable_nvlink: bool = Field(False, description="UCX over NVLink (cuda mode).")
    rmm_pool_size: str | None = Field(None, description="RMM pool size per GPU worker.")
    cuda_visible_devices: str | None = Field(None, description="GPUs to use, e.g. '0,1'.")
    cluster_class: str | None = Field(None, description="Dotted path of a cluster manager class.")
    cluster_kwargs: dict[str, Any] = Field(default_factory=dict, description="Kwargs for cluster_class.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device for xgboost and the encoder.")
    train_layout: Literal["auto", "single", "distributed"] = Field(
        "auto", description="Training layout: auto picks from the data (tasks/train_layout.py); single = one "
        "worker with every thread of its host; distributed = xgboost.dask on every worker.")

    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if self.mode == "cuda" else "cpu"

    def cluster_kwargs_for_mode(self) -> dict[str, Any]:
        """The keyword arguments the cluster class is built with (pure; unit-tested without GPUs)."""
        if self.mode == "local":
            return {
                "n_workers": self.n_workers or 2,
                "threads_per_worker": self.threads_per_worker,
                "memory_limit": self.memory_limit,
                "processes": True,
                "host": "127.0.0.1",
                "dashboard_address": ":0",
            }
        if self.mode == "cuda":
            kwargs: dict[str, Any] = {
                "protocol": self.protocol,
                "threads_per_worker": self.threads_per_worker,
                "memory_limit": self.memory_limit,
                "dashboard_address": ":0",
            }
            if self.n_workers:
                kwargs["n_workers"] = self.n_workers
            if self.protocol != "tcp":
                kwargs.update(enable_infiniband=self.enable_infiniband, enable_nvlink=self.enable_nvlink)
            if self.rmm_pool_size:
                kwargs["rmm_pool_size"] = self.rmm_pool_size
            if self.cuda_visible_devices:
                kwargs["CUDA_VISIBLE_DEVICES"] = self.cuda_visible_devices
            return kwargs
        return dict(self.cluster_kwargs)

    def cluster_class_path(self) -> str | None:
        return {
            "local": "distributed.LocalCluster",
            "cuda": "dask_cuda.LocalCUDACluster",
            "cluster_class": self.cluster_class,
            "address": None,
        }[self.mode]

    def _cache_key(self) -> str:
        return self.model_dump_json(exclude={"device", "train_layout"})  # same workers whatever runs on them

    def _start_cluster(self) -> Any:
        path = self.cluster_class_path()
        if not path:
            raise LifecycleError("DaskCompute: mode=cluster_class needs cluster_class")
        cls = resolve_class(path)
        try:
            return cls(**self.cluster_kwargs_for_mode())
        except Exception as exc:  # the GPU/cluster library's own error, named in one line
            raise LifecycleError(f"DaskCompute ({self.mode}): cannot start {path}: {exc}") from exc

    def check(self, report: ComputeReport) -> None:
        """Fail in one line when the workers cannot do what this block asks (pure: unit-tested on CPU).

        Raises:
            LifecycleError: no workers; a GPU mode or device=cuda on workers without a GPU; two
                workers on one GPU (xgboost needs one GPU per worker); UCX asked for but the scheduler
                talks another protocol; InfiniBand or NVLink asked for but no such transport active.
        """
        where = f"DaskCompute ({self.mode} {report.scheduler})"
        if not report.workers:
            raise LifecycleError(f"{where}: the scheduler has no workers")
        if self.mode == "cuda" or self.resolved_device == "cuda":
            lacking = [w for w in report.workers if not w.gpus]
            if lacking:
                why = "mode=cuda" if self.mode == "cuda" else "device=cuda"
                raise LifecycleError(
                    f"{where}: {why} but {len(lacking)} of {len(report.workers)} worker(s) see no GPU "
                    f"({lacking[0].address}: {lacking[0].gpu_probe or 'no GPU found'})")
            owners: dict[str, str] = {}
            for w in report.workers:
                if w.gpu_uuid and w.gpu_uuid in owners:
                    raise LifecycleError(f"{where}: workers {owners[w.gpu_uuid]} and {w.address} share GPU "
                                         f"{w.gpu_uuid}; xgboost needs one GPU per worker")
                owners[w.gpu_uuid] = w.address
        if self.mode == "cuda" and self.protocol in UCX_PROTOCOLS:
            if report.protocol not in UCX_PROTOCOLS:
                raise LifecycleError(f"{where}: protocol={self.protocol} but the scheduler talks {report.protocol}")
            wanted = [("enable_infiniband", self.enable_infiniband, lambda t: t.startswith(INFINIBAND_TRANSPORTS),
                       "InfiniBand (rc/ud/dc)"),
                      ("enable_nvlink", self.enable_nvlink, lambda t: t == NVLINK_TRANSPORT, "NVLink (cuda_ipc)")]
            for w in report.workers:
                for flag, asked, matches, what in wanted:
                    if asked and w.ucx_transports and not any(matches(t) for t in w.ucx_transports):
                        raise LifecycleError(f"{where}: {flag} but worker {w.address} has no {what} transport "
                                             f"(active: {', '.join(w.ucx_transports)})")

    def preflight(self, client: Any) -> ComputeReport:
        """Ask every worker what it has, log it as one line, and `check` it against this block.

        Costs one `client.run` round trip (tens of ms on CPU workers); GPU and UCX libraries are
        imported on the workers only.
        """
        info = client.scheduler_info(n_workers=-1)
        scheduler = str(client.scheduler.address)
        protocol = scheduler.split("://", 1)[0] if "://" in scheduler else "tcp"
        probes = client.run(probe_worker, protocol in UCX_PROTOCOLS, on_error="return") if info["workers"] else {}
        workers = []
        for address, meta in sorted(info["workers"].items()):
            probe = probes.get(address)
            found = probe if isinstance(probe, dict) else {"gpu_probe": f"probe failed: {probe!r}"[:200]}
            workers.append(WorkerResources(address=address, name=str(meta.get("name", "")),
                                           threads=int(meta.get("nthreads") or 0),
                                           memory_limit=int(meta.get("memory_limit") or 0), **found))
        report = ComputeReport(mode=self.mode, scheduler=scheduler, protocol=protocol, device=self.resolved_device,
                               workers=workers)
        _logger().info("compute: %s", report.summary())
        self.check(report)
        return report

    @contextmanager
    def get_client(self, check: bool = True) -> Iterator[Any]:
        """A connected `distributed.Client`; started clusters are reused by later stages of the run.

        Args:
            check: Run `preflight` first (every stage should; pass False to call it yourself and keep
                its report, as training does to tag the MLflow run).
        """
        from distributed import Client

        if self.mode == "address":
            if not self.address:
                raise LifecycleError("DaskCompute: mode=address needs address")
            target: Any = self.address
        else:
            with _LOCK:
                key = self._cache_key()
                target = _CLUSTERS.get(key)
                if target is None or getattr(target, "status", None) in ("closed", "closing"):
                    if not _CLUSTERS:
                        atexit.register(_close_clusters)
                    target = _CLUSTERS[key] = self._start_cluster()
        try:
            client = Client(target, set_as_default=False, timeout="30s")
        except OSError as exc:
            raise LifecycleError(f"DaskCompute: cannot reach the scheduler at {target}: {exc}") from exc
        try:
            if check:
                self.preflight(client)
            yield client
        finally:
            client.close()


def _logger() -> Any:
    """The Prefect run logger inside a flow or task (the report lands in the run's logs), else stdlib."""
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - MissingContextError outside a run
        return logging.getLogger("lifecycle.compute")


def close_local_clusters(compute: DaskCompute | None = None) -> None:
    """Stop the clusters this process started (the CLI calls it when a run ends), or only `compute`'s."""
    with _LOCK:
        if compute is None:
            _close_clusters()
            return
        cluster = _CLUSTERS.pop(compute._cache_key(), None)
    if cluster is not None:
        cluster.close()
