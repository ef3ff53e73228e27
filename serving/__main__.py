"""`python -m serving --config FILE`: serve one deployment snapshot under a gunicorn arbiter.

This process is the arbiter (the deploy task starts it as a detached process group, or as a
container's command, watches `/health`, and stops the group); it binds the port, forks `workers`
uvicorn workers (`serving.worker.ServingWorker`, bounded per client by `serving.limits`) and
replaces any that dies: a worker killed by SIGSEGV is back within about one model load, and the
others answer meanwhile. SIGTERM stops it gracefully (5 s for in-flight requests).

Why gunicorn and not our own SO_REUSEPORT supervisor: ours stopped everything when one worker died,
and gunicorn measured within 10 % of it (0.97x req/s, issue 13). gunicorn sets TCP_NODELAY on its
listener, so the delayed-ACK stall of `uvicorn --workers` (uvicorn issue #3149) does not happen; one
shared listener instead of one per worker.

A config that cannot be read exits with status 2 and one line on stderr; a model that cannot be
loaded makes the first worker print one line and exit, and gunicorn then stops (status 3, "Worker
failed to boot") rather than restarting it in a loop. The deploy task shows the log's tail.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import resource
import sys
from typing import TYPE_CHECKING, Any

from gunicorn.app.base import BaseApplication

from lifecycle.errors import LifecycleError

if TYPE_CHECKING:
    from serving.config import ServingConfig

WORKER_CLASS = "serving.worker.ServingWorker"
BOOT_ERROR = 3  # gunicorn's Arbiter.WORKER_BOOT_ERROR: the arbiter halts instead of respawning


def single_threaded_numerics(config: ServingConfig) -> bool:
    """A tabular server (no text, no index) runs its numeric libraries on one thread.

    Why: a one-row prediction takes ~0.1 ms, and OpenMP/OpenBLAS threads spin-wait after each one; two
    worker processes with spinning helper threads on 2 cores halved throughput (measured with wrk at 8
    connections: 483 vs 1577 req/s). Must run before numpy/xgboost are imported; an explicit setting
    in the environment wins. Text models keep torch's threads (one encoder batch uses them all).
    """
    import json
    from pathlib import Path

    try:
        schema = json.loads((Path(config.model_dir) / "feature_schema.json").read_text())
    except (OSError, ValueError):
        return False  # the model load reports it properly
    if config.index is not None or schema.get("embedding_dim"):
        return False
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    return True


def freeze_startup_heap() -> None:
    """Move every object alive after the model and index loaded out of the collector's sight.

    Why: they live as long as the worker (model, modules, the app), and each full collection on the
    request path walked all of them: the tail of `/invocations` at 64 connections on one process
    (benchmarks/serve.py `--only invocations64`). Garbage made by requests is still collected.
    """
    gc.collect()
    gc.freeze()


def raise_fd_limit() -> None:
    """Soft file-descriptor limit up to the hard one: the connection cap, not the OS, should refuse first."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ServingArbiter(BaseApplication):
    """gunicorn, configured from the snapshot config; each worker loads the app itself (no preload).

    Why no preload: LanceDB's tokio runtime and torch's thread pools do not survive a fork, and a
    worker that loads its own model is also what a respawn after a crash needs.
    """

    def __init__(self, config: ServingConfig, workers: int) -> None:
        self.serving_config, self.workers = config, workers
        super().__init__()

    def load_config(self) -> None:
        assert self.cfg is not None
        settings: dict[str, Any] = {
            "bind": [bind_address(self.serving_config.host, self.serving_config.port)], "workers": self.workers,
            "worker_class": WORKER_CLASS, "graceful_timeout": 5, "timeout": 120, "backlog": 2048,
            "keepalive": max(1, round(self.serving_config.limits.keep_alive_s)), "loglevel": "warning",
            "accesslog": None,
        }
        # Keep `setproctitle` out of the environment (it is not in the lock): with it, gunicorn rewrites
        # the command line by which the deploy task recognises its server (`-m serving --config`).
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        """In the worker: the app (model, index), before it accepts a connection."""
        from serving.app import create_app

        try:
            app = create_app(self.serving_config)
        except LifecycleError as exc:
            print(f"serving: {exc}", file=sys.stderr, flush=True)
            sys.exit(BOOT_ERROR)
        freeze_startup_heap()
        config = self.serving_config
        print(f"serving: deployment {config.deployment_id} on http://{bind_address(config.host, config.port)} "
              f"(worker PID {os.getpid()})", file=sys.stderr, flush=True)
        return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving", description="Serve one lifecycle deployment.")
    parser.add_argument("--config", required=True, help="Path of the snapshot's config.json.")
    parser.add_argument("--workers", type=int, default=None, help="Worker processes (default: the config's).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from serving.config import ServingConfig

    try:
        config = ServingConfig.read(args.config)
    except LifecycleError as exc:
        print(f"serving: {exc}", file=sys.stderr, flush=True)
        return 2
    single_threaded_numerics(config)  # before any worker imports numpy or xgboost
    raise_fd_limit()
    ServingArbiter(config, args.workers or config.workers).run()  # returns only through sys.exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
