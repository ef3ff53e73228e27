"""What a Dask compute target really offers, asked of its workers: threads, memory, GPUs, UCX transports.

`DaskCompute.preflight` runs `probe_worker` on every worker (one `client.run` round trip) and compares
the resulting `ComputeReport` with what the block asks for. The probes run on the workers, so GPU and
UCX libraries are imported only there; each falls back (pynvml → cupy → nvidia-smi) and says which one
answered, so a report read later explains itself.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
from typing import Any

from pydantic import BaseModel, Field

UCX_PROTOCOLS = ("ucx", "ucxx")
INFINIBAND_TRANSPORTS = ("rc", "ud", "dc")  # UCX names them rc_verbs, rc_mlx5, ud_verbs, dc_mlx5, …
NVLINK_TRANSPORT = "cuda_ipc"


class WorkerResources(BaseModel):
    """One worker as it sees itself (GPUs through the CUDA-visible devices of its own process)."""

    address: str
    name: str = ""
    threads: int = 0
    memory_limit: int = Field(0, description="Bytes; 0 = no limit.")
    gpus: list[str] = Field(default_factory=list, description="Visible GPUs; model code runs on the first.")
    gpu_memory: list[int] = Field(default_factory=list, description="Bytes per visible GPU.")
    gpu_uuid: str = Field("", description="UUID of the GPU model code runs on (two workers must not share one).")
    gpu_probe: str = Field("", description="What found the GPUs (pynvml, cupy, nvidia-smi) or why none did.")
    ucx_transports: list[str] = Field(default_factory=list, description="Active UCX transports (UCX comms).")


class ComputeReport(BaseModel):
    """What a compute target actually offers; logged by every stage and tagged on every training run."""

    mode: str
    scheduler: str
    protocol: str = Field(..., description="Scheme of the scheduler address: tcp, ucx, ucxx, inproc.")
    device: str = Field(..., description="Device the block asks model code to use.")
    workers: list[WorkerResources]

    @property
    def threads(self) -> int:
        return sum(w.threads for w in self.workers)

    @property
    def memory(self) -> int:
        return sum(w.memory_limit for w in self.workers)

    @property
    def gpu_workers(self) -> int:
        """Workers that have a GPU to run model code on."""
        return sum(1 for w in self.workers if w.gpus)

    def _gpu_names(self) -> list[str]:
        return sorted({w.gpus[0] for w in self.workers if w.gpus})

    def _transports(self) -> list[str]:
        return sorted({t for w in self.workers for t in w.ucx_transports})

    def summary(self) -> str:
        names = self._gpu_names()
        gpus = f"{self.gpu_workers} with a GPU ({', '.join(names)})" if names else "no GPU"
        ucx = self._transports()
        return (f"{self.mode} {self.scheduler}: {len(self.workers)} worker(s), {self.threads} thread(s), "
                f"{self.memory / 2**30:.1f} GiB, {gpus}, device {self.device}"
                + (f", UCX {'/'.join(ucx)}" if ucx else ""))

    def tags(self, prefix: str = "lifecycle.compute.") -> dict[str, str]:
        """Flat string tags for MLflow (values cut short: MLflow caps tag length)."""
        values = {
            "mode": self.mode, "scheduler": self.scheduler, "protocol": self.protocol, "device": self.device,
            "workers": len(self.workers), "threads": self.threads, "memory_bytes": self.memory,
            "gpu_workers": self.gpu_workers, "gpu_names": ", ".join(self._gpu_names()),
            "gpus_visible_per_worker": ",".join(str(len(w.gpus)) for w in self.workers),
            "ucx_transports": ",".join(self._transports()),
        }
        return {f"{prefix}{k}": str(v)[:500] for k, v in values.items()}


def _visible(indices: list[int]) -> list[int]:
    """The device indices CUDA_VISIBLE_DEVICES leaves to this process, in its order (NVML ignores it)."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return indices
    items = [item.strip() for item in raw.split(",") if item.strip()]
    if not all(item.isdigit() for item in items):  # UUIDs / MIG names: cannot map them to indices
        return indices
    return [int(item) for item in items if int(item) in indices]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def probe_gpus() -> tuple[list[dict[str, Any]], str]:
    """([{name, memory, uuid}], probe) for the GPUs this process can use, in CUDA order.

    Runs on a worker and imports lazily. pynvml is cheap and exact; cupy also creates the CUDA
    context (a warm-up for the first kernel); nvidia-smi works where neither package is installed.
    """
    notes = []
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handles = {i: pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())}
            gpus = [{"name": _text(pynvml.nvmlDeviceGetName(handles[i])),
                     "memory": int(pynvml.nvmlDeviceGetMemoryInfo(handles[i]).total),
                     "uuid": _text(pynvml.nvmlDeviceGetUUID(handles[i]))} for i in _visible(sorted(handles))]
        finally:
            pynvml.nvmlShutdown()
        if gpus:
            return gpus, "pynvml"
        notes.append("pynvml: no device")
    except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, driver errors
        notes.append(f"pynvml: {type(exc).__name__}")
    try:
        import cupy

        runtime = cupy.cuda.runtime
        props = [runtime.getDeviceProperties(i) for i in range(runtime.getDeviceCount())]
        if props:
            return [{"name": _text(p["name"]), "memory": int(p["totalGlobalMem"]),
                     "uuid": _text(p.get("uuid", b"").hex() if isinstance(p.get("uuid"), bytes) else p.get("uuid", ""))}
                    for p in props], "cupy"
        notes.append("cupy: no device")
    except Exception as exc:  # noqa: BLE001 - ImportError, CUDARuntimeError (no driver / no device)
        notes.append(f"cupy: {type(exc).__name__}")
    smi = shutil.which("nvidia-smi")
    if smi is None:
        notes.append("nvidia-smi: not found")
        return [], "; ".join(notes)
    try:
        out = subprocess.run([smi, "--query-gpu=index,uuid,memory.total,name", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        rows = {}
        for line in out.strip().splitlines():
            index, uuid, memory, name = (part.strip() for part in line.split(",", 3))
            rows[int(index)] = {"name": name, "memory": int(float(memory)) * 2**20, "uuid": uuid}
        gpus = [rows[i] for i in _visible(sorted(rows))]
        if gpus:
            return gpus, "nvidia-smi"
        notes.append("nvidia-smi: no device")
    except (subprocess.SubprocessError, OSError, ValueError) as exc:
        notes.append(f"nvidia-smi: {type(exc).__name__}")
    return [], "; ".join(notes)


def probe_ucx() -> list[str]:
    """Active UCX transports of this process: ucxx (protocol ucx/ucxx), else ucx-py."""
    for module in ("ucxx", "ucp"):
        try:
            return sorted(importlib.import_module(module).get_active_transports())
        except Exception:  # noqa: BLE001 - not installed, or UCX not usable in this process
            continue
    return []


def probe_worker(with_ucx: bool = False) -> dict[str, Any]:
    """What `preflight` asks of every worker through `client.run` (GPU modules imported only here)."""
    gpus, probe = probe_gpus()
    return {"gpus": [g["name"] for g in gpus], "gpu_memory": [g["memory"] for g in gpus],
            "gpu_uuid": gpus[0]["uuid"] if gpus else "", "gpu_probe": probe,
            "ucx_transports": probe_ucx() if with_ucx else []}
