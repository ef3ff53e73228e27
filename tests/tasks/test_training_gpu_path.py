"""The GPU training path's configuration, run on the CPU with cupy stood in (the real path runs in
benchmarks/gpu on a GPU machine)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from lifecycle.errors import LifecycleError
from lifecycle.sample import SAMPLE_SPEC
from lifecycle.spec import parse_spec


def _spec(**overrides):
    return parse_spec({**SAMPLE_SPEC, "source": "tickets.csv", **overrides})


class _DeviceArray:
    """Stands in for cupy.ndarray (no GPU here): what `cupy.asarray` returned, and `.get()` back to host."""

    def __init__(self, array):
        self.host = np.asarray(array)

    def get(self):
        return self.host.copy()


def test_cuda_partitions_go_to_the_gpu_in_the_task_that_builds_them(monkeypatch):
    """The configuration the GPU path builds, run here with cupy stood in: each partition's matrix and
    labels are built and moved to the device inside one task, and results come back through `.get()`."""
    import types

    import dask.dataframe as dd

    from lifecycle.features import build_schema
    from lifecycle.sample import generate_tickets
    from tasks.train_data import host_arrays, matrix_side

    calls = []
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(asarray=lambda a: calls.append(a.shape)
                                                                   or _DeviceArray(a)))
    spec = _spec()
    frame = generate_tickets(300)
    schema = build_schema(spec, {"channel": ["chat", "email", "phone", "web"], "plan": ["enterprise", "free", "pro"]},
                          ["account", "billing", "shipping", "technical"])
    ddf = dd.from_pandas(frame, npartitions=3)
    X, y = matrix_side(ddf, ddf["ticket_id"] > 0, schema, "category", "cuda")
    blocks = [d.compute(scheduler="sync") for a in (X, y) for d in a.to_delayed().ravel()]
    assert all(isinstance(b, _DeviceArray) for b in blocks) and len(blocks) == 6
    assert sorted(calls) == sorted([(100, 6)] * 3 + [(100,)] * 3)  # one move per partition, nothing else
    host_X, host_y = (a.compute(scheduler="sync") for a in host_arrays(X, y))
    assert isinstance(host_X, np.ndarray) and host_X.shape == (300, 6) and host_X.dtype == np.float32
    cpu_X, _ = matrix_side(ddf, ddf["ticket_id"] > 0, schema, "category", "cpu")
    assert np.array_equal(host_X, cpu_X.compute(scheduler="sync"), equal_nan=True)
    assert host_y.tolist() == [["account", "billing", "shipping", "technical"].index(c) for c in frame["category"]]


def test_cuda_without_cupy_on_the_worker_fails_in_one_line():
    from tasks.train_data import to_device, to_host

    plain = np.zeros(3, np.float32)
    assert to_device(plain, "cpu") is plain and to_host(plain) is plain
    with pytest.raises(LifecycleError, match=r"device=cuda needs cupy on the Dask workers \(pip install cupy-cuda13x"):
        to_device(plain, "cuda")
