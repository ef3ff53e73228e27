"""The server processes the CLI starts: the commands Prefect and MLflow document (`prefect server
start`, `mlflow server`, `prefect worker start`), each in a session of its own, recorded as `Started`.

`lifecycle up` keeps them until `lifecycle down`; `lifecycle run` starts a temporary Prefect server for
one run (`run_server`) when it is told of no other.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.processes import Started, start_process, stop_process, wait_http

REPO = Path(__file__).resolve().parent.parent


def executable(name: str) -> str:
    """This environment's console script `name` (beside the interpreter), else `name` from PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def prefect_env(home: Path, api_url: str | None = None, database_url: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(home / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PREFECT_UI_ENABLED": "true"}
    for noisy in ("PREFECT_PROFILE", "PREFECT_API_KEY"):
        env.pop(noisy, None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    else:
        env.pop("PREFECT_API_URL", None)
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    return env


def start_prefect_server(home: Path, host: str, port: int, database_url: str | None = None,
                         extra_env: dict[str, str] | None = None, env: dict[str, str] | None = None,
                         name: str = "prefect-server") -> Started:
    """`prefect server start` in its own session, logging to `home/logs/<name>.log`.

    Args:
        env: the whole environment to start it in (default: `up`'s, with PREFECT_HOME under `home`).
    """
    env = {**(env if env is not None else prefect_env(home, database_url=database_url)), **(extra_env or {})}
    url = f"http://{host}:{port}/api"
    return start_process(name, [executable("prefect"), "server", "start", "--host", host, "--port", str(port)],
                         env, home / "logs" / f"{name}.log", url=url)


@contextmanager
def run_server(home: Path) -> Iterator[str]:
    """A temporary Prefect server on 127.0.0.1 for one `lifecycle run`, in its own session (so a signal to
    the run's process group does not reach it: cli/stopping.py); yields its API URL.

    It uses Prefect's own settings (PREFECT_HOME, its database), as the temporary server Prefect would
    start itself, and is stopped (its whole process tree) when the block ends, however it ends.
    """
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    server = start_prefect_server(home, "127.0.0.1", port, env=env, name="prefect-run-server")
    url = server.url or f"http://127.0.0.1:{port}/api"
    try:
        wait_http(server, f"{url}/health")
        yield url
    except BaseException:
        # A stop, most often: the server's graceful shutdown (seconds) runs beside the rest of the
        # teardown (the Dask cluster's close) in a thread that is not a daemon, so the process still
        # waits for it before it exits (and cli.stopping's watchdog bounds the whole).
        threading.Thread(target=stop_process, args=(server,), kwargs={"grace_s": 5.0},
                         name="stop-prefect-run-server").start()
        raise
    stop_process(server, grace_s=5.0)


def start_mlflow_server(home: Path, host: str, port: int, backend_uri: str, artifacts: str | None = None) -> Started:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    argv = [executable("mlflow"), "server", "--host", host, "--port", str(port), "--workers", "1",
            "--backend-store-uri", backend_uri,
            "--artifacts-destination", artifacts or (home / "mlartifacts").resolve().as_uri()]
    return start_process("mlflow-server", argv, env, home / "logs" / "mlflow-server.log", cwd=home,
                         url=f"http://{host}:{port}")


def start_worker(home: Path, api_url: str, pool: str = "lifecycle-process", query_seconds: float = 5.0,
                 cwd: Path = REPO, extra_env: dict[str, str] | None = None) -> Started:
    env = {**prefect_env(home, api_url=api_url), "PREFECT_WORKER_QUERY_SECONDS": str(query_seconds),
           "LIFECYCLE_HOME": str(home), **(extra_env or {})}
    return start_process("prefect-worker", [executable("prefect"), "worker", "start", "--pool", pool], env,
                         home / "logs" / "prefect-worker.log", cwd=cwd)
