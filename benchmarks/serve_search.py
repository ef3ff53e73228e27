"""Serving benchmark, `/search`: today's server against the previous revision's search path, side by side.

Run by benchmarks/serve.py (or alone: `python -m benchmarks.serve_search --seconds 10`). The index is
the sample's tickets (2,000 rows, real MiniLM vectors, metadata category/plan/channel) in a local
LanceDB table, searched exactly (no ANN index at this size). Both servers are one process, unpinned
(as the process target runs), with the same encoder settings, measured with the same wrk POST
(`{"query": …, "k": 5, "filter": {"category": "billing"}}`) at 8 and 64 connections:

- **ours**: `python -m serving` (gunicorn arbiter, one uvicorn worker): concurrent queries share
  encoder batches (serving.batching.QueryBatcher), the LanceDB query runs in a thread, and the query
  encoder runs at the default `search_precision` ("auto": bfloat16 on a CPU with AMX, else float32;
  the figure's baseline note says which it was).
- **ours, float32**: the same server with `search_precision: float32`, so what batching alone gives
  stays visible beside what the precision adds (recorded with "query encoder float32" in the name).
- **previous**: the previous revision's route, reproduced here (`previous_app`): each request calls
  `Searcher.search` (embed one query, then query LanceDB) in Starlette's threadpool, as it did before
  micro-batching; the filter is the equivalent SQL string.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request  # module level: FastAPI resolves the handlers' annotations here
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

CONFIG_ENV = "LIFECYCLE_BENCH_SEARCH_CONFIG"
QUERY = "refund for my invoice"


def build_index(dest: Path, rows: int = 2000) -> tuple[str, str]:
    """(LanceDB URI, table) of the sample's tickets with their MiniLM vectors."""
    import lancedb
    import pyarrow as pa

    from lifecycle.encoder import encode, prepare_texts
    from lifecycle.sample import generate_tickets

    frame = generate_tickets(rows, seed=5)
    vectors = encode(prepare_texts(frame["text"], 2000))
    table = pa.table({"id": pa.array(range(rows), pa.int64()),
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1]),
                      "text": frame["text"].astype(str).tolist(),
                      **{c: frame[c].astype(str).tolist() for c in ("category", "plan", "channel")}})
    db = lancedb.connect(str(dest))
    db.create_table("tickets", table)
    return str(dest), "tickets"


def previous_app() -> Any:
    """The previous revision's `/search` (per-request embed + query in the threadpool), for uvicorn --factory."""
    from lifecycle.search import Searcher

    config = json.loads(Path(os.environ[CONFIG_ENV]).read_text())
    searcher = Searcher(config["uri"], config["table"])
    app = FastAPI()

    @app.post("/search")
    async def search(request: Request) -> Response:
        payload = json.loads(await request.body())
        where = " AND ".join(f"{c} = '{v}'" for c, v in (payload.get("filter") or {}).items()) or None
        results = await run_in_threadpool(searcher.search, payload["query"], payload.get("k", 5), where)
        return Response(json.dumps({"results": results}, default=str), media_type="application/json")

    @app.get("/health")
    async def health() -> Response:
        return Response('{"status": "ok"}', media_type="application/json")

    return app


def bench_search(model_dir: Path, args: Any, work: Path) -> dict[str, dict[int, dict]]:
    """{"ours"|"previous": {connections: wrk result}} at 8 and 64 connections."""
    from benchmarks.serve import free_port, start, stop, wrk
    from serving.config import IndexRef, ServingConfig

    uri, table = build_index(work / "search-lancedb")
    payload = json.dumps({"query": QUERY, "k": 5, "filter": {"category": "billing"}})
    out: dict[str, dict[int, dict]] = {"ours": {}, "ours-float32": {}, "previous": {}}
    for name in ("previous", "ours-float32", "ours"):
        port = free_port()
        log = work / f"search-{name}.log"
        if name.startswith("ours"):
            config = ServingConfig(model_dir=str(model_dir), lineage={"deployment_id": "bench"}, port=port,
                                   index=IndexRef(uri=uri, table=table),
                                   search_precision="float32" if name == "ours-float32" else "auto")
            cmd = [sys.executable, "-m", "serving", "--config", str(config.write(work / f"search-{name}.json"))]
            env = None
        else:
            (work / "search-previous.json").write_text(json.dumps({"uri": uri, "table": table}))
            cmd = [sys.executable, "-m", "uvicorn", "--factory", "benchmarks.serve_search:previous_app",
                   "--port", str(port), "--log-level", "warning", "--no-access-log"]
            env = {CONFIG_ENV: str(work / "search-previous.json")}
        proc = start(cmd, f"http://127.0.0.1:{port}/health", log, env=env)
        url = f"http://127.0.0.1:{port}/search"
        try:
            for c in (8, 64):
                wrk(url, payload, 2, c, work)  # warm-up
                r = wrk(url, payload, args.seconds, c, work)
                out[name][c] = r
                print(f"  search {name}, c={c}: {r['rps']:.0f} req/s, p50 {r['p50_ms']:.1f} ms, "
                      f"p99 {r['p99_ms']:.1f} ms, errors {r['errors']}, non-2xx {r['non2xx']}", flush=True)
                if r["non2xx"]:
                    raise RuntimeError(f"search benchmark ({name}): non-2xx answers, see {log}")
        finally:
            stop(proc)
    return out


def record_search(rec: Any, results: dict[str, dict[int, dict]]) -> None:
    from lifecycle.encoder import query_precision

    precision = query_precision("auto")
    for variant, suffix in (("ours", ""), ("ours-float32", ", query encoder float32")):
        for c, goal in ((8, "≥ 3× the previous revision's req/s"), (64, "p99 ≤ 250 ms")):
            ours, prev = results[variant][c], results["previous"][c]
            note = f"query encoder {precision}, " if variant == "ours" else ""
            rec(f"serve.search.rps (2,000-row LanceDB, k=5, filter, 1 process, c={c}{suffix})", ours["rps"], "req/s",
                baseline=f"previous revision's search path, same run ({note}previous p50 {prev['p50_ms']:.1f} ms, "
                f"p99 {prev['p99_ms']:.1f} ms)", baseline_value=prev["rps"], goal=goal if c == 8 else None)
            rec(f"serve.search.p99 (c={c}{suffix})", ours["p99_ms"], "ms", baseline="previous revision's p99",
                baseline_value=prev["p99_ms"], higher_is_better=False, goal=goal if c == 64 else None)


def main(argv: list[str] | None = None) -> None:
    import tempfile

    from benchmarks import serve

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--results", type=Path, default=serve.RESULTS)
    args = parser.parse_args(argv)
    serve._results = args.results
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        work = Path(tmp)
        model_dir = serve.train_model(work / "model", text=False, rounds=50)
        record_search(serve.rec, bench_search(model_dir, args, work))


if __name__ == "__main__":
    main()
