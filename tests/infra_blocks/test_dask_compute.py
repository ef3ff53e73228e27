"""DaskCompute: cluster arguments per mode (GPU modes checked without GPUs), and a real local cluster."""

from __future__ import annotations

import pytest

from infra_blocks import DaskCompute
from infra_blocks.compute_report import ComputeReport
from infra_blocks.dask_compute import resolve_class
from lifecycle.errors import LifecycleError


def test_cuda_mode_kwargs_carry_ucx_settings():
    block = DaskCompute(mode="cuda", protocol="ucx", enable_infiniband=True, enable_nvlink=True,
                        rmm_pool_size="24GB", cuda_visible_devices="0,1", n_workers=None)
    kwargs = block.cluster_kwargs_for_mode()
    assert kwargs["protocol"] == "ucx"
    assert kwargs["enable_infiniband"] and kwargs["enable_nvlink"]
    assert kwargs["rmm_pool_size"] == "24GB"
    assert kwargs["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert "n_workers" not in kwargs  # one worker per visible GPU
    assert block.cluster_class_path() == "dask_cuda.LocalCUDACluster"
    assert block.resolved_device == "cuda"


def test_tcp_cuda_mode_omits_ucx_transports():
    kwargs = DaskCompute(mode="cuda", protocol="tcp").cluster_kwargs_for_mode()
    assert "enable_infiniband" not in kwargs


def test_cluster_class_mode_passes_kwargs_through():
    block = DaskCompute(mode="cluster_class", cluster_class="dask_jobqueue.SLURMCluster",
                        cluster_kwargs={"cores": 8, "memory": "64GB"})
    assert block.cluster_kwargs_for_mode() == {"cores": 8, "memory": "64GB"}
    assert block.resolved_device == "cpu"


def test_resolve_class_errors_are_one_line():
    with pytest.raises(LifecycleError, match="cannot import"):
        resolve_class("no_such_module.Cluster")
    with pytest.raises(LifecycleError, match="dotted path"):
        resolve_class("Cluster")


def test_local_cluster_is_multi_process_and_shared(local_compute):
    with local_compute.get_client() as client:
        workers = client.scheduler_info()["workers"]
        pids = set(client.run(lambda: __import__("os").getpid()).values())
    with local_compute.get_client() as again:
        assert set(again.scheduler_info()["workers"]) == set(workers)
    assert len(workers) == 2 and len(pids) == 2


def test_training_layout_is_not_part_of_the_cluster():
    """Forcing a layout trains differently on the same workers: no second cluster is started for it."""
    auto = DaskCompute(mode="local", n_workers=2, threads_per_worker=1)
    forced = auto.model_copy(update={"train_layout": "distributed"})
    assert auto.train_layout == "auto" and auto._cache_key() == forced._cache_key()
    assert auto._cache_key() != auto.model_copy(update={"threads_per_worker": 2})._cache_key()


def test_address_mode_needs_an_address():
    with pytest.raises(LifecycleError, match="needs address"):
        with DaskCompute(mode="address").get_client():
            pass


# --- preflight: what the workers have, checked against what the block asks ----------------------------

def _report(block: DaskCompute, protocol: str = "tcp", **worker) -> ComputeReport:
    """A report as `preflight` builds it, for workers that look like `worker` (GPU hosts cannot run here)."""
    from infra_blocks.compute_report import ComputeReport, WorkerResources

    workers = [WorkerResources(address=f"{protocol}://10.0.0.{i}:4000", threads=8, memory_limit=2**34,
                               **{k: (v[i] if k == "gpu_uuid" else v) for k, v in worker.items()}) for i in range(2)]
    return ComputeReport(mode=block.mode, scheduler=f"{protocol}://10.0.0.9:8786", protocol=protocol,
                         device=block.resolved_device, workers=workers)


def test_preflight_reports_the_real_local_workers(local_compute):
    with local_compute.get_client(check=False) as client:
        report = local_compute.preflight(client)
    assert len(report.workers) == 2 and report.threads == 2 and report.memory > 0
    assert report.protocol == "tcp" and report.device == "cpu" and report.gpu_workers == 0
    assert all(w.gpus == [] and "nvidia-smi" in w.gpu_probe for w in report.workers)  # each probe says why none
    assert report.summary().startswith(f"local {report.scheduler}: 2 worker(s), 2 thread(s), ")
    assert report.summary().endswith("no GPU, device cpu")
    tags = report.tags()
    assert tags["lifecycle.compute.workers"] == "2" and tags["lifecycle.compute.gpu_workers"] == "0"
    assert all(isinstance(v, str) and len(v) <= 500 for v in tags.values())


def test_device_cuda_on_cpu_workers_fails_before_any_work(local_compute):
    """The same real workers, asked for CUDA: the check fails in one line naming a worker and why."""
    cuda = local_compute.model_copy(update={"device": "cuda"})
    with pytest.raises(LifecycleError, match=r"device=cuda but 2 of 2 worker\(s\) see no GPU \(tcp://127\.0\.0\.1:\d+: "
                                             r"pynvml: ModuleNotFoundError") as err:
        with cuda.get_client():
            pass
    assert "\n" not in str(err.value)


def test_a_scheduler_without_workers_is_refused():
    from distributed import LocalCluster

    block = DaskCompute(mode="address", address="unused")
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as cluster:
        block = block.model_copy(update={"address": cluster.scheduler_address})
        with pytest.raises(LifecycleError, match="the scheduler has no workers"):
            with block.get_client():
                pass


def test_address_mode_preflights_real_worker_processes(dask_cluster):
    block = DaskCompute(mode="address", address=dask_cluster.address)
    with block.get_client(check=False) as client:
        report = block.preflight(client)
    assert report.scheduler == dask_cluster.address and report.mode == "address"
    assert sorted(w.name for w in report.workers) == ["w0", "w1"]
    assert {w.memory_limit for w in report.workers} == {3 * 2**30}


def test_cuda_mode_needs_a_gpu_on_every_worker():
    block = DaskCompute(mode="cuda")
    with pytest.raises(LifecycleError, match=r"mode=cuda but 2 of 2 worker\(s\) see no GPU \(tcp://10\.0\.0\.0:4000: "
                                             r"cupy: ImportError\)"):
        block.check(_report(block, gpu_probe="cupy: ImportError"))
    block.check(_report(block, gpus=["NVIDIA H100 80GB HBM3"], gpu_uuid=["GPU-a", "GPU-b"]))


def test_two_workers_on_one_gpu_are_refused():
    block = DaskCompute(mode="cuda")
    with pytest.raises(LifecycleError, match="share GPU GPU-a; xgboost needs one GPU per worker"):
        block.check(_report(block, gpus=["NVIDIA H100"], gpu_uuid=["GPU-a", "GPU-a"]))


def test_ucx_settings_are_checked_against_the_active_transports():
    gpu = dict(gpus=["NVIDIA H100"], gpu_uuid=["GPU-a", "GPU-b"])
    ucx = DaskCompute(mode="cuda", protocol="ucx", enable_infiniband=True, enable_nvlink=True)
    with pytest.raises(LifecycleError, match="protocol=ucx but the scheduler talks tcp"):
        ucx.check(_report(ucx, "tcp", **gpu))
    with pytest.raises(LifecycleError, match=r"enable_infiniband but worker ucx://10\.0\.0\.0:4000 has no InfiniBand "
                                             r"\(rc/ud/dc\) transport \(active: cuda_copy, cuda_ipc, tcp\)"):
        ucx.check(_report(ucx, "ucx", ucx_transports=["cuda_copy", "cuda_ipc", "tcp"], **gpu))
    with pytest.raises(LifecycleError, match="enable_nvlink but .* has no NVLink \\(cuda_ipc\\) transport"):
        ucx.check(_report(ucx, "ucx", ucx_transports=["rc_mlx5", "tcp"], **gpu))
    report = _report(ucx, "ucx", ucx_transports=["cuda_copy", "cuda_ipc", "rc_mlx5", "tcp"], **gpu)
    ucx.check(report)
    assert report.tags()["lifecycle.compute.ucx_transports"] == "cuda_copy,cuda_ipc,rc_mlx5,tcp"
    assert report.summary().endswith("2 with a GPU (NVIDIA H100), device cuda, UCX cuda_copy/cuda_ipc/rc_mlx5/tcp")


def test_visible_devices_follow_cuda_visible_devices(monkeypatch):
    from infra_blocks.compute_report import _visible

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _visible([0, 1, 2, 3]) == [0, 1, 2, 3]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")  # dask-cuda rotates the list: worker 2 uses GPU 2
    assert _visible([0, 1, 2, 3]) == [2, 0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5f1c")  # UUIDs cannot be mapped to NVML indices
    assert _visible([0, 1]) == [0, 1]
