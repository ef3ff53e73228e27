"""Serving benchmark, kept components: the HAProxy edge against direct, gunicorn against our supervisor.

Run by benchmarks/serve.py in the same run, on the same tabular model, body and wrk settings:
- **edge**: one `python -m serving` process (pinned to CPU 0) measured direct and through HAProxy
  with exactly the config the docker edge renders (tasks/haproxy.py; servers as IP:port, HAProxy
  unpinned), alternating direct/edge `--edge-rounds` times so drift on a busy machine hits both.
  Goal: through the edge ≥ 0.9× direct req/s, p99 ≤ 10 ms.
- **workers**: `python -m serving` with N workers (our SO_REUSEPORT supervisor) against
  `gunicorn -k <UvicornWorker> -w N serving.asgi:app`, both unpinned, same N. The worker class is the
  `uvicorn-worker` package's when installed, else uvicorn's own deprecated `uvicorn.workers`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.serve import free_port, our_server, start, stop, wrk


def ensure_haproxy() -> str | None:
    """The haproxy binary (Debian's, installed with apt-get when missing and root); None: not here."""
    found = shutil.which("haproxy")
    if found or os.geteuid() != 0:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "haproxy"], env=env,
                   capture_output=True)
    return shutil.which("haproxy")


def _mean(runs: list[dict]) -> dict:
    keys = ("rps", "p50_ms", "p90_ms", "p99_ms", "errors", "non2xx", "requests")
    return {k: sum(r[k] for r in runs) / len(runs) for k in keys}


def _show(name: str, r: dict) -> None:
    print(f"  {name}: {r['rps']:.0f} req/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
          f"errors {r['errors']:.0f}, non-2xx {r['non2xx']:.0f}", flush=True)


def bench_edge(model_dir: Path, payload: str, args: Any, work: Path) -> tuple[dict, dict] | None:
    """(direct, through the edge): the same server process, alternated; None without haproxy."""
    from tasks import haproxy as hx

    binary = ensure_haproxy()
    if binary is None:
        print("  edge skipped: haproxy is not installed (apt-get install haproxy)")
        return None
    port, edge_port = free_port(), free_port()
    server = our_server(model_dir, port, 1, work / "edge-backend.log")
    config = hx.EdgeConfig(bind_host="127.0.0.1", port=edge_port, socket_path=str(work / "edge.sock"),
                           max_body_bytes=1_048_576, nameserver=None)
    route = hx.Route(live="a", slots={"a": hx.Upstream(address=f"127.0.0.1:{port}", deployment_id="bench")})
    edge = hx.start_local(config, route, work / "edge", binary)
    direct_url, edge_url = f"http://127.0.0.1:{port}/invocations", f"http://127.0.0.1:{edge_port}/invocations"
    direct, through = [], []
    try:
        wrk(direct_url, payload, 2, args.connections, work)  # warm-up
        wrk(edge_url, payload, 2, args.connections, work)
        for _ in range(args.edge_rounds):
            direct.append(wrk(direct_url, payload, args.seconds, args.connections, work))
            through.append(wrk(edge_url, payload, args.seconds, args.connections, work))
    finally:
        stop(edge)
        stop(server)
    d, e = _mean(direct), _mean(through)
    _show("direct, 1 process pinned to CPU 0", d)
    _show("through the HAProxy edge", e)
    if d["non2xx"] or e["non2xx"]:
        raise RuntimeError("edge benchmark: non-2xx answers (see the logs under the work folder)")
    return d, e


def worker_class() -> str:
    """gunicorn's `-k`: the maintained `uvicorn-worker` package when installed, else uvicorn's own."""
    try:
        import uvicorn_worker  # noqa: F401

        return "uvicorn_worker.UvicornWorker"
    except ImportError:
        return "uvicorn.workers.UvicornWorker"


def gunicorn_server(model_dir: Path, port: int, workers: int, log: Path) -> subprocess.Popen:
    from serving.asgi import CONFIG_ENV
    from serving.config import ServingConfig

    config = ServingConfig(model_dir=str(model_dir), lineage={"deployment_id": "bench"}, port=port, workers=workers)
    path = config.write(log.with_suffix(".json"))
    cmd = [str(Path(sys.executable).parent / "gunicorn"), "-k", worker_class(), "-w", str(workers),
           "-b", f"127.0.0.1:{port}", "--log-level", "warning", "--graceful-timeout", "5", "serving.asgi:app"]
    return start(cmd, f"http://127.0.0.1:{port}/health", log, env={CONFIG_ENV: str(path)})


def bench_workers(model_dir: Path, payload: str, args: Any, work: Path) -> tuple[dict, dict]:
    """(ours, gunicorn) with `args.workers` processes each, one after the other, same load."""
    n, out = args.workers, {}
    for name, factory in (("ours", our_server), ("gunicorn", gunicorn_server)):
        port = free_port()
        proc = factory(model_dir, port, n, work / f"workers-{name}.log")
        url = f"http://127.0.0.1:{port}/invocations"
        try:
            wrk(url, payload, 2, args.connections, work)
            out[name] = wrk(url, payload, args.seconds, args.connections, work)
        finally:
            stop(proc)
        _show(f"{name}, {n} workers", out[name])
        if out[name]["non2xx"]:
            raise RuntimeError(f"workers benchmark ({name}): non-2xx answers")
    return out["ours"], out["gunicorn"]


def record_edge(rec: Any, direct: dict, edge: dict, c: int, trees: int) -> None:
    rec(f"serve.edge.rps (through the HAProxy edge, 1 process pinned to CPU 0, c={c}, {trees} trees, 1 row)",
        edge["rps"], "req/s", baseline=f"the same server direct (p50 {direct['p50_ms']:.2f} ms, "
        f"p99 {direct['p99_ms']:.2f} ms)", baseline_value=direct["rps"], goal="≥ 0.9× direct")
    rec(f"serve.edge.p99 (through the HAProxy edge, c={c})", edge["p99_ms"], "ms", baseline="direct p99",
        baseline_value=direct["p99_ms"], higher_is_better=False, goal="p99 ≤ 10 ms")


def record_workers(rec: Any, ours: dict, gunicorn: dict, c: int, n: int) -> None:
    rec(f"serve.supervisor.rps (python -m serving, {n} SO_REUSEPORT workers, unpinned, c={c})", ours["rps"], "req/s",
        baseline=f"gunicorn -k {worker_class()} -w {n} (p50 {gunicorn['p50_ms']:.2f} ms, "
        f"p99 {gunicorn['p99_ms']:.2f} ms)", baseline_value=gunicorn["rps"],
        goal="reported: keep our supervisor only if it is not slower")
    rec(f"serve.supervisor.p99 ({n} workers, c={c})", ours["p99_ms"], "ms", baseline="gunicorn p99",
        baseline_value=gunicorn["p99_ms"], higher_is_better=False)
