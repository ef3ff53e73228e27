"""Serving benchmark: our server against `mlflow models serve` on the same pyfunc, with the same wrk.

What is compared, side by side in one run on this machine:
- tabular: a 200-tree XGBoost (50 rounds x 4 classes) on the sample's features; single-row `dataframe_split` POSTs to
  `/invocations` at 8 connections. MLflow: `mlflow models serve --env-manager local` of the pyfunc train
  logs (serving.pyfunc.LifecycleModel). Ours: `python -m serving` on the same booster + schema, with one
  and with two worker processes (gunicorn's arbiter over uvicorn workers since issue 16; the figures keep
  the name "SO_REUSEPORT" of the supervisor before it, so they compare over time). Optionally the docker
  image too.
- text: the same model with the sentence embedding of the ticket text as features (the encoder runs per
  request). MLflow encodes each request alone; ours micro-batches concurrent requests through the
  encoder (1 torch thread), and is measured also without the straggler wait (`batch_collect_ms=0`).
  MLflow's baseline is its best variant: pinned or not, torch threads default or 1.
- image size (benchmarks/serve_images.py): our serving images against an image of the same model built
  the same way (same base, offline from the wheelhouse) with `mlflow` + the model's own requirements
  instead of our server.
- 64 connections (issue 16: p99 ≤ 50 ms at c=64 on 2 cores): each of our tabular servers is measured at 8,
  then at 64 connections on the same process in the same run (serve_linear.py: the same for the linear model).
- kept components (benchmarks/serve_edge.py): the tabular model through the HAProxy edge against
  direct, and plain gunicorn against `python -m serving` (gunicorn-based since issue 16; same workers).
- search (benchmarks/serve_search.py): `/search` at 8 and 64 connections against the previous revision's path.

wrk (Debian's, installed with apt-get when missing) runs with one thread pinned to the last CPU and
one-process servers (ours, MLflow) are pinned to CPU 0; the two-process server is left unpinned. A Lua
script sends the POST body and prints the latency percentiles wrk measured (`--latency`).
Usage: python -m benchmarks.serve [--seconds 10] [--skip-text|-images|-mlflow|-edge|-workers|-search]
       [--only invocations64|edge|text] [--edge-haproxy VARIANTS] [--results FILE]  (VARIANTS: serve_edge.py)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.harness import RESULTS, record

_results = RESULTS  # where `rec` appends; main() sets it from --results


def rec(*args: object, **kw: object) -> dict:
    return record(*args, results=_results, **kw)  # type: ignore[arg-type]  # into this run's results file

ROOT = Path(__file__).resolve().parent.parent
HIGH = 64  # issue 16's acceptance: `/invocations` p99 ≤ 50 ms at 64 connections on 2 cores
PROCESSES = (("ours1", "1 process, pinned to CPU 0"), ("ours2", "2 processes, SO_REUSEPORT, unpinned"))
LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[%s]==]
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRKJSON {\\"requests\\": %%d, \\"duration_us\\": %%d, \\"p50_us\\": %%d, " ..
    "\\"p90_us\\": %%d, \\"p99_us\\": %%d, \\"errors\\": %%d, \\"non2xx\\": %%d}\\n", summary.requests,
    summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_wrk() -> str:
    if shutil.which("wrk") or os.geteuid() != 0:
        return shutil.which("wrk") or sys.exit("wrk is missing: apt-get install -y wrk")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], env=env, check=True)
    return shutil.which("wrk") or sys.exit("wrk could not be installed")


# --- models ---------------------------------------------------------------------------------------


def train_model(dest: Path, text: bool, rows: int = 4000, rounds: int = 200) -> Path:
    """booster.json + feature_schema.json as the train stage saves them (text: + MiniLM embeddings)."""
    import xgboost as xgb

    from lifecycle.features import build_schema, encode_labels, feature_matrix
    from lifecycle.sample import SAMPLE_SPEC, generate_tickets
    from lifecycle.spec import parse_spec

    spec = parse_spec({**SAMPLE_SPEC, "source": "tickets.csv"})
    frame = generate_tickets(rows, seed=3)
    cats = {c: frame[c].dropna().unique().tolist() for c in spec.categorical_features}
    emb = None
    if text:
        from lifecycle.encoder import EMBED_DIM, encode, prepare_texts

        emb = encode(prepare_texts(frame[spec.text_column], 2000))
    schema = build_schema(spec, cats, sorted(frame[spec.label_column].unique().tolist()),
                          embedding_dim=EMBED_DIM if text else 0)
    dtrain = xgb.DMatrix(feature_matrix(frame, schema, emb), encode_labels(frame[spec.label_column], schema),
                         feature_names=schema.feature_names, feature_types=schema.feature_types,
                         enable_categorical=True)
    params = {"objective": "multi:softprob", "num_class": len(schema.classes), "max_depth": 6, "nthread": 2}
    booster = xgb.train(params, dtrain, num_boost_round=rounds)
    dest.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(dest / "booster.json"))
    (dest / "feature_schema.json").write_text(schema.model_dump_json())
    return dest


def save_pyfunc(model_dir: Path, dest: Path) -> Path:
    """The MLflow pyfunc exactly as train logs it (LifecycleModel, signature with params, code paths)."""
    import mlflow.pyfunc

    from lifecycle.sample import generate_tickets
    from serving.pyfunc import BoosterPredictor, LifecycleModel, code_paths, model_signature, pip_requirements

    predictor = BoosterPredictor.from_files(model_dir / "booster.json", model_dir / "feature_schema.json")
    example = generate_tickets(5, seed=2)[predictor.schema.input_columns]
    signature = model_signature(example, predictor.predict(example), predictor.schema.numeric)
    mlflow.pyfunc.save_model(str(dest), python_model=LifecycleModel(), code_paths=code_paths(dest.parent),
                             artifacts={"booster": str(model_dir / "booster.json"),
                                        "feature_schema": str(model_dir / "feature_schema.json")}, signature=signature,
                             pip_requirements=pip_requirements(bool(predictor.schema.embedding_dim)))
    return dest


def body(model_dir: Path) -> str:
    """One row of the sample in MLflow's dataframe_split form (what `mlflow models predict` sends)."""
    from lifecycle.features import FeatureSchema
    from lifecycle.sample import generate_tickets

    schema = FeatureSchema.model_validate_json((model_dir / "feature_schema.json").read_bytes())
    frame = generate_tickets(1, seed=11)[schema.input_columns]
    return json.dumps({"dataframe_split": json.loads(frame.to_json(orient="split", index=False))})


# --- servers -----------------------------------------------------------------------------------------


def pinned(cmd: list[str]) -> list[str]:
    """Run on CPU 0, apart from wrk (which runs on the last CPU)."""
    return ["taskset", "-c", "0", *cmd] if (os.cpu_count() or 1) > 1 else cmd


def start(cmd: list[str], url: str, log: Path, timeout_s: float = 180, env: dict | None = None) -> subprocess.Popen:
    """Start a server in its own process group and wait until `url` answers 200."""
    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
                "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT, env=full_env,
                            start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited: {log.read_text()[-800:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"{cmd[:4]} not ready after {timeout_s} s: {log.read_text()[-800:]}")


def stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue
    proc.wait()


def mlflow_server(pyfunc: Path, port: int, log: Path, threads: str | None = None, pin: bool = True) -> subprocess.Popen:
    """`mlflow models serve` (its defaults; `threads` sets OMP_NUM_THREADS, i.e. torch's threads)."""
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    env = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", **({"OMP_NUM_THREADS": threads} if threads else {})}
    cmd = [mlflow_bin, "models", "serve", "-m", str(pyfunc), "--env-manager", "local", "-h", "127.0.0.1",
           "-p", str(port)]
    return start(pinned(cmd) if pin else cmd, f"http://127.0.0.1:{port}/ping", log, env=env)


def our_server(model_dir: Path, port: int, workers: int, log: Path, **settings: object) -> subprocess.Popen:
    from serving.config import ServingConfig

    config = ServingConfig(model_dir=str(model_dir), lineage={"deployment_id": "bench"}, port=port, workers=workers,
                           **settings)  # type: ignore[arg-type]
    path = config.write(log.with_suffix(".json"))
    cmd = [sys.executable, "-m", "serving", "--config", str(path)]
    return start(pinned(cmd) if workers == 1 else cmd, f"http://127.0.0.1:{port}/health", log)


def wrk(url: str, payload: str, seconds: int, connections: int, lua_dir: Path) -> dict:
    """One wrk run (1 thread pinned to the last CPU); req/s, p50/p99 in ms, errors."""
    script = lua_dir / "post.lua"
    script.write_text(LUA % payload)
    cpu = str((os.cpu_count() or 1) - 1)  # the last CPU: one-process servers are on CPU 0
    out = subprocess.run(["taskset", "-c", cpu, ensure_wrk(), "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
                          "--timeout", "10s", "-s", str(script), url], capture_output=True, text=True,
                         timeout=seconds + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no summary: {out.stdout[-500:]} {out.stderr[-500:]}")
    raw = json.loads(line.removeprefix("WRKJSON "))
    return {"rps": raw["requests"] / (raw["duration_us"] / 1e6), "p50_ms": raw["p50_us"] / 1000,
            "p90_ms": raw["p90_us"] / 1000, "p99_ms": raw["p99_us"] / 1000, "errors": raw["errors"],
            "non2xx": raw["non2xx"], "requests": raw["requests"]}


def measure(name: str, proc_factory, url: str, payload: str, args, work: Path,
            connections: tuple[int, ...] = ()) -> dict[int, dict]:
    """{c: wrk result}: one server start and warm-up, then a run at each of `connections` (default: args')."""
    proc, out = proc_factory(), {}
    try:
        wrk(url, payload, 2, args.connections, work)  # warm-up (first requests, JIT of caches)
        for c in connections or (args.connections,):
            out[c] = wrk(url, payload, args.seconds, c, work)
    finally:
        stop(proc)
    for c, result in out.items():
        print(f"  {name}, c={c}: {result['rps']:.0f} req/s, {note(result)}, non-2xx {result['non2xx']}", flush=True)
        if result["non2xx"]:
            raise RuntimeError(f"{name}: {result['non2xx']} non-2xx answers at c={c} (see the server log)")
    return out


def note(r: dict) -> str:
    """p50/p99 (and wrk's socket errors, i.e. timeouts after 2 s, when there were any) of a run."""
    errors = f", {r['errors']} timeouts/socket errors" if r["errors"] else ""
    return f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms{errors}"


def bench_model(kind: str, text: bool, args, work: Path) -> dict[str, dict]:
    """{"mlflow": its best variant (none: --skip-mlflow), "ours<N>": {c: result}, tabular also at c=HIGH}."""
    model_dir = train_model(work / f"{kind}-model", text=text, rounds=args.rounds)
    payload = body(model_dir)
    results: dict[str, dict] = {}
    # MLflow's baseline: its best of pinned to CPU 0 (as our one process), unpinned, text: torch on one thread.
    variants: list[tuple[str, str | None, bool]] = [("pinned to CPU 0", None, True), ("unpinned", None, False)]
    variants += [("pinned to CPU 0, OMP_NUM_THREADS=1", "1", True)] if text else []
    pyfunc = save_pyfunc(model_dir, work / f"{kind}-pyfunc" / "model")
    for i, (label, threads, pin) in enumerate([] if args.skip_mlflow else variants):
        port = free_port()
        r = measure(f"{kind} mlflow models serve, {label}",
                    lambda port=port, i=i, threads=threads, pin=pin: mlflow_server(
                        pyfunc, port, work / f"{kind}-mlflow{i}.log", threads=threads, pin=pin),
                    f"http://127.0.0.1:{port}/invocations", payload, args, work)[args.connections]
        if "mlflow" not in results or r["rps"] > results["mlflow"]["rps"]:
            results["mlflow"] = {**r, "variant": label}
    if text:  # the same server without the straggler wait after a shared batch, beside it
        port = free_port()
        results["ours1-nowait"] = measure(
            f"{kind} ours, 1 process, batch_collect_ms=0", lambda port=port: our_server(
                model_dir, port, 1, work / f"{kind}-ours1-nowait.log", batch_collect_ms=0.0),
            f"http://127.0.0.1:{port}/invocations", payload, args, work)
    for workers in ((1, 2) if not text else (1,)):
        port = free_port()
        results[f"ours{workers}"] = measure(
            f"{kind} ours, {workers} process(es)", lambda port=port, workers=workers: our_server(
                model_dir, port, workers, work / f"{kind}-ours{workers}.log"),
            f"http://127.0.0.1:{port}/invocations", payload, args, work, () if text else (args.connections, HIGH))
    return results


def record_high(rec, model: str, results: dict[str, dict], c: int) -> None:
    """`serve.invocations.*` at HIGH connections against the same server process at c in the same run."""
    for key, label in ((k, label) for k, label in PROCESSES if HIGH in results.get(k, {})):
        r, low = results[key][HIGH], results[key][c]
        rec(f"serve.invocations.p99 ({model}, {label}, c={HIGH}, 1 row)", r["p99_ms"], "ms", goal="p99 ≤ 50 ms",
            baseline=f"the same server at c={c}, same run", baseline_value=low["p99_ms"], higher_is_better=False)
        rec(f"serve.invocations.rps ({model}, {label}, c={HIGH}, 1 row)", r["rps"], "req/s",
            baseline=f"the same server at c={c}, same run ({note(low)})", baseline_value=low["rps"])


def main(argv: list[str] | None = None) -> None:
    from benchmarks import serve_edge, serve_images

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=50, help="boosting rounds (x 4 classes = trees)")
    for part, what in (("text", "text model"), ("images", "image sizes"), ("mlflow", "MLflow (tabular and text)"),
                       ("search", "/search against the previous revision")):
        parser.add_argument(f"--skip-{part}", action="store_true", help=f"no {what}")
    parser.add_argument("--only", choices=("invocations64", "edge", "text"),
                        help=f"just ours at c and c={HIGH} (no MLflow), just the edge against direct, or just the "
                        "text model (with its MLflow baseline)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON lines the figures are appended to")
    serve_edge.add_arguments(parser)
    args = parser.parse_args(argv)
    for part in ("text", "images", "mlflow", "edge", "workers", "search") if args.only else ():
        setattr(args, f"skip_{part}", part != args.only)  # --only X: every other part off, MLflow's too
    text_only = args.only == "text"
    if text_only:
        args.skip_mlflow = False  # the text figures are ratios to MLflow's
    global _results
    _results = args.results
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ensure_wrk()
    c = args.connections
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work, trees = Path(tmp), args.rounds * 4
        tabular = not text_only and (not args.skip_mlflow or args.only == "invocations64")
        tab = bench_model("tabular", False, args, work) if tabular else {}
        model_dir = work / "tabular-model"
        model_dir = model_dir if tab or text_only else train_model(model_dir, text=False, rounds=args.rounds)
        if not text_only:
            serve_edge.kept(rec, model_dir, body(model_dir), args, work, trees)
        if not args.skip_search:
            from benchmarks import serve_search

            serve_search.record_search(rec, serve_search.bench_search(model_dir, args, work))
        base = tab.get("mlflow") or {}
        for key, label in PROCESSES if base else ():
            r = tab[key][c]
            rec(f"serve.tabular.rps ({label}, c={c}, {trees} trees, 1 row)", r["rps"], "req/s",
                   baseline=f"mlflow models serve --env-manager local, best variant: {base['variant']} ({note(base)})",
                   baseline_value=base["rps"], goal="≥ 10× MLflow's req/s")
            rec(f"serve.tabular.p50 ({label}, c={c})", r["p50_ms"], "ms", baseline="mlflow models serve p50",
                   baseline_value=base["p50_ms"], higher_is_better=False)
            rec(f"serve.tabular.p99 ({label}, c={c})", r["p99_ms"], "ms", baseline="mlflow models serve p99",
                   baseline_value=base["p99_ms"], higher_is_better=False, goal="p99 ≤ 10 ms")
        record_high(rec, f"tabular, {trees} trees", tab, c)  # c=HIGH beside them (alone with --only invocations64)
        if not args.skip_text and not args.skip_mlflow:
            txt = bench_model("text", True, args, work)
            ours, ref = txt["ours1"][c], txt["mlflow"]
            rec(f"serve.text.rps (MiniLM features, micro-batched, 1 process, c={c})", ours["rps"], "req/s",
                baseline=f"mlflow models serve of the same pyfunc, best variant: {ref['variant']} ({note(ref)})",
                baseline_value=ref["rps"], goal="≥ 3× MLflow's req/s")
            rec(f"serve.text.p99 (micro-batched, 1 process, c={c})", ours["p99_ms"], "ms",
                   baseline="mlflow models serve p99", baseline_value=ref["p99_ms"], higher_is_better=False)
            plain = txt["ours1-nowait"][c]
            rec(f"serve.text.rps (straggler wait after a shared batch, 1 process, c={c})", ours["rps"], "req/s",
                baseline=f"the same server with batch_collect_ms=0, same run ({note(plain)})",
                baseline_value=plain["rps"])
        if not args.skip_images:
            serve_images.image_sizes(rec, work)


if __name__ == "__main__":
    main()
