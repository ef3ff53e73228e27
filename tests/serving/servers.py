"""Real `python -m serving` processes for tests: started on a free 127.0.0.1 port, stopped with their group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

from serving.config import ServingConfig
from tests.tasks.test_serving import free_port

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def running(folder: Path, timeout_s: float = 60, **settings) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """Serve `folder`'s model (config from `settings`); yields (base URL, arbiter process, log file)."""
    config = ServingConfig(model_dir=str(folder), lineage={"deployment_id": "t"}, port=free_port(), **settings)
    path = config.write(folder.parent / f"config-{config.port}.json")
    log = folder.parent / f"server-{config.port}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "serving", "--config", str(path)], cwd=ROOT, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{config.port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert proc.poll() is None, f"server exited: {log.read_text()[-2000:]}"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"server not healthy: {log.read_text()[-2000:]}"
            time.sleep(0.1)
        yield url, proc, log
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def workers(proc: subprocess.Popen) -> set[int]:
    """PIDs of the arbiter's live worker processes."""
    return {c.pid for c in psutil.Process(proc.pid).children() if c.status() != psutil.STATUS_ZOMBIE}
