"""Serving benchmark, kept components: the HAProxy edge against direct, gunicorn against our supervisor.

Run by benchmarks/serve.py in the same run, on the same tabular model, body and wrk settings (the edge
also by benchmarks/serve_linear.py on the linear model; `--only edge` in either runs just that):
- **edge**: one `python -m serving` process (pinned to CPU 0) measured direct and through HAProxy
  with exactly the config the docker edge renders (tasks/haproxy.py; servers as IP:port, HAProxy
  unpinned), alternating direct/edge `--edge-rounds` times so drift on a busy machine hits both.
  Goal (issue 13): through the edge ≥ 0.9× direct req/s, p99 ≤ 10 ms at c=8. Why the linear model too:
  the 200-tree backend saturates near 1,000 req/s at c=8, so its own queueing (direct p99 above 10 ms)
  hides what the edge adds; the linear backend answers in well under a millisecond of CPU.
- **HAProxy variants** (`--edge-haproxy default,nbthread1,nbthread1-cpu1`): the product's config
  (HAProxy 2.6 starts a thread per CPU it may use) and the same text with `nbthread 1`, unpinned or
  pinned with `cpu-map 1/1 N`. Each variant is its own HAProxy in front of the same backend (idle while
  another is measured), measured in each round after direct. tasks/haproxy.py has no knob for this
  (yet): the lines are added to the text `start_local` renders (`_global_lines`), so the better variant
  can become its default later.
- **workers**: `python -m serving` with N workers (gunicorn's arbiter since issue 16; the figure keeps
  the name of the SO_REUSEPORT supervisor it replaced, so it compares over time) against
  `gunicorn -k <UvicornWorker> -w N serving.asgi:app`, both unpinned, same N. The worker class is the
  `uvicorn-worker` package's when installed, else uvicorn's own deprecated `uvicorn.workers`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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


def add_arguments(parser: argparse.ArgumentParser, workers: bool = True) -> None:
    """The edge's flags (and the workers comparison's, for serve.py)."""
    parser.add_argument("--skip-edge", action="store_true", help="no HAProxy edge against direct")
    parser.add_argument("--edge-rounds", type=int, default=2, help="direct/edge alternations")
    parser.add_argument("--edge-haproxy", type=variants, default=["default"], metavar="VARIANTS",
                        help="comma-separated HAProxy configs: default (the product's), nbthread1, nbthread1-cpuN")
    if workers:
        parser.add_argument("--skip-workers", action="store_true", help="no gunicorn against our supervisor")
        parser.add_argument("--workers", type=int, default=2, help="worker processes, ours and gunicorn's")


def haproxy_variant(name: str) -> tuple[str, list[str]]:
    """(label in figure names, lines added to `global`) of a variant: default | nbthread1 | nbthread1-cpuN."""
    if name == "default":
        return "", []
    match = re.fullmatch(r"nbthread1(?:-cpu(\d+))?", name)
    if match is None:
        raise argparse.ArgumentTypeError(f"HAProxy variant {name!r}: default, nbthread1 or nbthread1-cpuN")
    cpu = match.group(1)
    return (f"nbthread 1 on CPU {cpu}" if cpu else "nbthread 1 unpinned",
            ["    nbthread 1", *([f"    cpu-map 1/1 {cpu}"] if cpu else [])])


def variants(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        haproxy_variant(name)  # an unknown one fails at parse time, not after the model is trained
    return names


@contextmanager
def _global_lines(lines: list[str]) -> Iterator[None]:
    """`lines` appended to `global` in what tasks/haproxy.py renders while this is open.

    `start_local` renders, checks (`haproxy -c`) and starts the config in one call with no hook for
    extra settings, so its module's `render_config` is wrapped for that one call.
    """
    from tasks import haproxy as hx

    original = hx.render_config

    def render(config: Any, route: Any) -> str:
        text = original(config, route)
        if lines and "\nglobal\n" not in text:
            raise RuntimeError("tasks/haproxy.py renders no `global` section: the HAProxy variant cannot be applied")
        return text.replace("\nglobal\n", "\nglobal\n" + "".join(f"{line}\n" for line in lines), 1)

    hx.render_config = render
    try:
        yield
    finally:
        hx.render_config = original


def bench_edge(model_dir: Path, payload: str, args: Any, work: Path) -> tuple[dict, dict[str, dict]] | None:
    """(direct, {variant: through that edge}): one server process, each round direct then every variant;
    None without haproxy."""
    from tasks import haproxy as hx

    binary = ensure_haproxy()
    if binary is None:
        print("  edge skipped: haproxy is not installed (apt-get install haproxy)")
        return None
    port = free_port()
    server = our_server(model_dir, port, 1, work / "edge-backend.log")
    route = hx.Route(live="a", slots={"a": hx.Upstream(address=f"127.0.0.1:{port}", deployment_id="bench")})
    urls, edges = {"direct": f"http://127.0.0.1:{port}/invocations"}, []
    runs: dict[str, list[dict]] = {name: [] for name in ("direct", *args.edge_haproxy)}
    try:
        for name in args.edge_haproxy:
            edge_port, lines = free_port(), haproxy_variant(name)[1]
            config = hx.EdgeConfig(bind_host="127.0.0.1", port=edge_port, socket_path=str(work / f"edge-{name}.sock"),
                                   max_body_bytes=1_048_576, nameserver=None)
            with _global_lines(lines):
                edges.append(hx.start_local(config, route, work / f"edge-{name}", binary))
            if not all(line in (work / f"edge-{name}" / "haproxy.cfg").read_text() for line in lines):
                raise RuntimeError(f"edge variant {name}: its lines are not in the config HAProxy started with")
            urls[name] = f"http://127.0.0.1:{edge_port}/invocations"
        for url in urls.values():
            wrk(url, payload, 2, args.connections, work)  # warm-up
        for _ in range(args.edge_rounds):
            for name, url in urls.items():
                runs[name].append(wrk(url, payload, args.seconds, args.connections, work))
    finally:
        for edge in edges:
            stop(edge)
        stop(server)
    means = {name: _mean(r) for name, r in runs.items()}
    for name, r in means.items():
        _show("direct, 1 process pinned to CPU 0" if name == "direct" else f"through the HAProxy edge, {name}", r)
    if any(r["non2xx"] for r in means.values()):
        raise RuntimeError("edge benchmark: non-2xx answers (see the logs under the work folder)")
    direct = means.pop("direct")
    if len(means) > 1:
        best = max(means, key=lambda n: (means[n]["rps"], -means[n]["p99_ms"]))
        print(f"  best HAProxy variant here: {best} ({means[best]['rps'] / direct['rps']:.2f}x direct req/s, "
              f"p99 {means[best]['p99_ms']:.2f} ms)", flush=True)
    return direct, means


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


def run_edge(rec: Any, model_dir: Path, payload: str, args: Any, work: Path, model: str = "",
             trees: int | None = None) -> None:
    """bench_edge, then its figures (none without haproxy)."""
    pair = bench_edge(model_dir, payload, args, work)
    if pair is not None:
        record_edge(rec, *pair, args.connections, model, trees)


def kept(rec: Any, model_dir: Path, payload: str, args: Any, work: Path, trees: int) -> None:
    """The kept-component comparisons on serve.py's tabular model (each unless its --skip-…)."""
    if not args.skip_edge:
        run_edge(rec, model_dir, payload, args, work, trees=trees)
    if not args.skip_workers:
        ours, gunicorn = bench_workers(model_dir, payload, args, work)
        record_workers(rec, ours, gunicorn, args.connections, args.workers)


def record_edge(rec: Any, direct: dict, edges: dict[str, dict], c: int, model: str = "",
                trees: int | None = None) -> None:
    """serve.edge.* per variant; the product's config keeps the tabular names earlier runs recorded."""
    for name, edge in edges.items():
        through = ", ".join(p for p in ("through the HAProxy edge", haproxy_variant(name)[0], model) if p)
        size = f", {trees} trees" if trees else ""
        rec(f"serve.edge.rps ({through}, 1 process pinned to CPU 0, c={c}{size}, 1 row)", edge["rps"], "req/s",
            baseline=f"the same server direct (p50 {direct['p50_ms']:.2f} ms, p99 {direct['p99_ms']:.2f} ms)",
            baseline_value=direct["rps"], goal="≥ 0.9× direct")
        rec(f"serve.edge.p99 ({through}, c={c})", edge["p99_ms"], "ms", baseline="direct p99",
            baseline_value=direct["p99_ms"], higher_is_better=False, goal="p99 ≤ 10 ms")


def record_workers(rec: Any, ours: dict, gunicorn: dict, c: int, n: int) -> None:
    rec(f"serve.supervisor.rps (python -m serving, {n} SO_REUSEPORT workers, unpinned, c={c})", ours["rps"], "req/s",
        baseline=f"gunicorn -k {worker_class()} -w {n} (p50 {gunicorn['p50_ms']:.2f} ms, "
        f"p99 {gunicorn['p99_ms']:.2f} ms)", baseline_value=gunicorn["rps"],
        goal="reported: keep our supervisor only if it is not slower")
    rec(f"serve.supervisor.p99 ({n} workers, c={c})", ours["p99_ms"], "ms", baseline="gunicorn p99",
        baseline_value=gunicorn["p99_ms"], higher_is_better=False)
