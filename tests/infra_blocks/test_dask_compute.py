"""DaskCompute: cluster arguments per mode (GPU modes checked without GPUs), and a real local cluster."""

from __future__ import annotations

import pytest

from infra_blocks import DaskCompute
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


def test_address_mode_needs_an_address():
    with pytest.raises(LifecycleError, match="needs address"):
        with DaskCompute(mode="address").get_client():
            pass
