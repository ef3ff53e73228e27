"""DaskCompute: where embedding and training run.

`local` starts a multi-process LocalCluster on this machine, `cuda` a dask-cuda LocalCUDACluster
(one worker per GPU, UCX/InfiniBand/NVLink as configured), `address` connects to a running scheduler,
and `cluster_class` builds any cluster manager (dask-kubernetes, dask-jobqueue) from a dotted path.
GPU modules are imported only inside `get_client()` on the machine that uses them.
"""

from __future__ import annotations

import atexit
import importlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from prefect.blocks.core import Block
from pydantic import Field

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
        return self.model_dump_json(exclude={"device"})

    def _start_cluster(self) -> Any:
        path = self.cluster_class_path()
        if not path:
            raise LifecycleError("DaskCompute: mode=cluster_class needs cluster_class")
        cls = resolve_class(path)
        try:
            return cls(**self.cluster_kwargs_for_mode())
        except Exception as exc:  # the GPU/cluster library's own error, named in one line
            raise LifecycleError(f"DaskCompute ({self.mode}): cannot start {path}: {exc}") from exc

    @contextmanager
    def get_client(self) -> Iterator[Any]:
        """A connected `distributed.Client`; started clusters are reused by later stages of the run."""
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
            yield client
        finally:
            client.close()


def close_local_clusters() -> None:
    """Stop the clusters this process started (the CLI calls it when a run ends)."""
    with _LOCK:
        _close_clusters()
