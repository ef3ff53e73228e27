"""`python -m serving --config FILE`: run the server(s) of one deployment snapshot.

One process per worker, no reload, access log off, log level warning. The deploy task starts this as
a detached process group (or as a container's command), watches `/health`, and stops it by PID (or
container). A config or model that cannot be loaded exits with status 2 and one line on stderr (the
deploy task shows the log's tail).

Why our own listening sockets rather than `uvicorn --workers N`: uvicorn's shared socket leaves
TCP_NODELAY off (every keep-alive response then waits ~44 ms for the client's delayed ACK) and one
worker tends to accept every connection. Here each worker process binds its own listener with
SO_REUSEPORT, so the kernel spreads connections across them, and TCP_NODELAY is set on the listener
(Linux copies it to every accepted connection). With `workers > 1` this process only supervises:
it forwards SIGTERM/SIGINT to the workers and exits (status 1) as soon as one of them dies, so that
the deploy task, docker's restart policy or HEALTHCHECK notice.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
from typing import TYPE_CHECKING

from lifecycle.errors import LifecycleError

if TYPE_CHECKING:
    from serving.config import ServingConfig


def listen_socket(host: str, port: int, reuse_port: bool = False, backlog: int = 2048) -> socket.socket:
    """A bound, listening TCP socket with TCP_NODELAY (and SO_REUSEPORT when several workers share the port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise LifecycleError(f"cannot listen on {host}:{port} ({exc.strerror})") from exc
    sock.listen(backlog)
    return sock


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


def serve(config_path: str, reuse_port: bool) -> int:
    """Load the app (model, index) first, then open the port: a listening server is a ready server."""
    from serving.config import ServingConfig

    try:
        config = ServingConfig.read(config_path)
        single_threaded_numerics(config)
        import uvicorn

        from serving.app import create_app

        app = create_app(config)
        sock = listen_socket(config.host, config.port, reuse_port)
    except LifecycleError as exc:
        print(f"serving: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"serving: deployment {config.deployment_id} on http://{config.host}:{config.port} (PID {os.getpid()})",
          file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, server_header=False,
                                           timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    return 0


def supervise(config_path: str, workers: int) -> int:
    """Start `workers` server processes on the same port and wait; any worker's exit stops them all."""
    argv = [sys.executable, "-m", "serving", "--config", config_path, "--worker"]
    children = [subprocess.Popen(argv, stdin=subprocess.DEVNULL) for _ in range(workers)]
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    pid, status = os.wait()  # the first worker to end, whatever the reason
    failed = next((c for c in children if c.pid == pid), None)
    if not stopping:
        code = os.waitstatus_to_exitcode(status)
        print(f"serving: worker {pid} exited ({code}); stopping the others", file=sys.stderr, flush=True)
        forward(signal.SIGTERM, None)
    for child in children:
        if child is not failed:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    return 0 if stopping else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving", description="Serve one lifecycle deployment.")
    parser.add_argument("--config", required=True, help="Path of the snapshot's config.json.")
    parser.add_argument("--workers", type=int, default=None, help="Server processes (default: the config's).")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one of a supervisor's workers
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.worker:
        return serve(args.config, reuse_port=True)
    workers = args.workers
    if workers is None:
        from serving.config import ServingConfig

        try:
            workers = ServingConfig.read(args.config).workers
        except LifecycleError as exc:
            print(f"serving: {exc}", file=sys.stderr, flush=True)
            return 2
    if workers > 1:
        return supervise(args.config, workers)
    return serve(args.config, reuse_port=False)


if __name__ == "__main__":
    sys.exit(main())
