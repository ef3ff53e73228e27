"""The training layout chosen from the data and the workers (pure: made-up preflight reports)."""

from __future__ import annotations

from infra_blocks.compute_report import ComputeReport, WorkerResources
from tasks.train_layout import GiB, choose_layout, host_of


def _report(*workers: tuple[str, int, int], gpus: int = 0) -> ComputeReport:
    return ComputeReport(mode="address", scheduler="tcp://s:8786", protocol="tcp", device="cpu", workers=[
        WorkerResources(address=a, threads=t, memory_limit=m, gpus=["H200"] * gpus,
                        gpu_memory=[140 * GiB] * gpus) for a, t, m in workers])


LOCAL = _report(("tcp://127.0.0.1:4001", 1, 4 * GiB), ("tcp://127.0.0.1:4002", 1, 4 * GiB))


def test_data_that_fits_one_worker_trains_there_with_every_thread_of_its_host():
    layout = choose_layout(51_000, 388, 58, LOCAL)  # the catalogue case of the issue
    assert layout.kind == "single" and layout.workers == 1 and layout.nthread == 2
    assert layout.worker == "tcp://127.0.0.1:4001"
    assert "51000 train rows × 388 features, 58 output(s) per round: fits one worker" in layout.reason
    tags = layout.tags()
    assert tags["lifecycle.layout.kind"] == "single" and tags["lifecycle.layout.evaluation"].startswith("in process")


def test_data_larger_than_one_worker_is_spread_over_all_of_them():
    layout = choose_layout(50_000_000, 28, 2, LOCAL)
    assert layout.kind == "distributed" and layout.workers == 2 and layout.worker is None
    assert "more than one worker's 4.00 GiB" in layout.reason
    assert layout.tags()["lifecycle.layout.dmatrix"] == "DaskQuantileDMatrix on every worker"


def test_several_hosts_scale_out_once_the_data_is_large_enough():
    hosts = _report(("tcp://10.0.0.1:1", 8, 64 * GiB), ("tcp://10.0.0.2:1", 8, 64 * GiB),
                    ("tcp://10.0.0.2:2", 8, 64 * GiB))
    small = choose_layout(50_000, 100, 10, hosts)
    assert small.kind == "single" and small.nthread == 16  # the host with the most threads, all of them
    assert host_of(small.worker or "") == "10.0.0.2"
    big = choose_layout(1_000_000, 100, 10, hosts)
    assert big.kind == "distributed" and big.workers == 3 and "3 hosts" not in big.reason and "2 hosts" in big.reason


def test_gpus_one_gpu_while_it_fits_else_all():
    gpus = _report(("tcp://127.0.0.1:1", 1, 64 * GiB), ("tcp://127.0.0.1:2", 1, 64 * GiB), gpus=1)
    assert choose_layout(1_000_000, 28, 2, gpus, device="cuda").kind == "single"
    assert choose_layout(1_000_000, 28, 2, gpus, device="cuda").nthread == 1
    assert choose_layout(10_000_000, 28, 2, gpus, device="cuda").kind == "distributed"


def test_a_single_worker_or_a_forced_layout():
    one = _report(("tcp://127.0.0.1:1", 4, 4 * GiB))
    alone = choose_layout(1000, 5, 2, one)
    assert alone.kind == "single" and alone.nthread == 4  # no evaluation through Dask on the one worker
    assert choose_layout(1000, 5, 2, LOCAL, forced="distributed").kind == "distributed"
    forced = choose_layout(50_000_000, 28, 2, LOCAL, forced="single")
    assert forced.kind == "single" and "forced" in forced.reason
