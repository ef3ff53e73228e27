"""Serving benchmark for the linear model: our server against `mlflow models serve` of the same pyfunc.

What is compared, side by side in one run on this machine, with benchmarks/serve.py's wrk, pinning and
servers: the linear model the train stage registers when it beats xgboost (TF-IDF 1-2-grams of the
ticket text + one-hot categoricals + scaled numerics → logistic regression, fit on the sample and
exported by tasks/linear_export.py exactly as a train run does), single-row `dataframe_split` POSTs
to `/invocations`. MLflow: `mlflow models serve --env-manager local` of the pyfunc train logs
(serving.pyfunc.LifecycleModel with the `linear` artifact), best of pinned to CPU 0 and unpinned.
Ours: `python -m serving` on the same files (serving/linear.py: the TF-IDF transform and one sparse
product in numpy, no sklearn, no pandas per request), one process pinned to CPU 0 and two processes,
each at 8 and then at 64 connections on the same process (issue 16: p99 ≤ 50 ms at c=64 on 2 cores;
`serve.invocations.*`, as serve.py records them for the tabular model). Then the HAProxy edge against
direct with this model as the backend (benchmarks/serve_edge.py: what the edge adds, without the
200-tree backend's own queueing in the way).

Usage: python -m benchmarks.serve_linear [--seconds 10] [--rows 4000] [--only invocations64|edge]
       [--skip-edge] [--edge-rounds 2] [--edge-haproxy default,nbthread1,nbthread1-cpu1] [--results FILE]
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
from pathlib import Path

from benchmarks import serve_edge
from benchmarks.harness import RESULTS, record
from benchmarks.serve import (
    HIGH,
    PROCESSES,
    body,
    ensure_wrk,
    free_port,
    measure,
    mlflow_server,
    note,
    our_server,
    record_high,
)


def linear_model(dest: Path, rows: int) -> Path:
    """feature_schema.json + linear_model.npz as the train stage saves a linear pick (text + tabular)."""
    from lifecycle.features import build_schema
    from lifecycle.sample import SAMPLE_SPEC, generate_tickets
    from lifecycle.spec import parse_spec
    from tasks.linear_export import fit_and_export

    spec = parse_spec({**SAMPLE_SPEC, "source": "tickets.csv", "train": {"use_text_embeddings": True}})
    frame = generate_tickets(rows, seed=3)
    cats = {c: frame[c].dropna().astype(str).unique().tolist() for c in spec.categorical_features}
    fit_and_export(spec, frame, build_schema(spec, cats, sorted(frame[spec.label_column].unique().tolist())), dest)
    return dest


def save_pyfunc(model_dir: Path, dest: Path) -> Path:
    """The MLflow pyfunc exactly as train logs a linear model (LifecycleModel, signature, code paths)."""
    import mlflow.pyfunc

    from lifecycle.sample import generate_tickets
    from serving.pyfunc import LifecycleModel, code_paths, load_predictor, model_signature, pip_requirements

    predictor = load_predictor(model_dir)
    example = generate_tickets(5, seed=2)[predictor.schema.input_columns]
    signature = model_signature(example, predictor.predict(example), predictor.schema.numeric)
    mlflow.pyfunc.save_model(str(dest), python_model=LifecycleModel(), code_paths=code_paths(dest.parent),
                             artifacts={"linear": str(model_dir / "linear_model.npz"),
                                        "feature_schema": str(model_dir / "feature_schema.json")},
                             signature=signature, input_example=example, pip_requirements=pip_requirements(False))
    return dest


def bench(model_dir: Path, args: argparse.Namespace, work: Path) -> dict[str, dict]:
    """{"mlflow": its best variant (none with --only), "ours<N>": {c: result} at c and c=HIGH}."""
    pyfunc = save_pyfunc(model_dir, work / "linear-pyfunc" / "model")
    payload = body(model_dir)  # serve.body: one sample row, text included (the schema's input columns)
    results: dict[str, dict] = {}
    for i, (label, pin) in enumerate(() if args.only else (("pinned to CPU 0", True), ("unpinned", False))):
        port = free_port()
        r = measure(f"linear mlflow models serve, {label}",
                    lambda port=port, i=i, pin=pin: mlflow_server(pyfunc, port, work / f"mlflow{i}.log", pin=pin),
                    f"http://127.0.0.1:{port}/invocations", payload, args, work)[args.connections]
        if "mlflow" not in results or r["rps"] > results["mlflow"]["rps"]:
            results["mlflow"] = {**r, "variant": label}
    for workers in (1, 2):
        port = free_port()
        results[f"ours{workers}"] = measure(
            f"linear ours, {workers} process(es)",
            lambda port=port, workers=workers: our_server(model_dir, port, workers, work / f"ours{workers}.log"),
            f"http://127.0.0.1:{port}/invocations", payload, args, work, (args.connections, HIGH))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rows", type=int, default=4000, help="sample rows the linear model is fit on")
    parser.add_argument("--only", choices=("invocations64", "edge"),
                        help=f"just ours at c and c={HIGH} (no MLflow), or just the edge against direct")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON lines the figures are appended to")
    serve_edge.add_arguments(parser, workers=False)
    args = parser.parse_args(argv)
    args.skip_edge = args.skip_edge or args.only == "invocations64"
    rec = functools.partial(record, results=args.results)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ensure_wrk()
    c = args.connections
    with tempfile.TemporaryDirectory(prefix="bench-serve-linear-") as tmp:
        work = Path(tmp)
        model_dir = linear_model(work / "linear-model", args.rows)
        results = bench(model_dir, args, work) if args.only != "edge" else {}
        if not args.skip_edge:
            serve_edge.run_edge(rec, model_dir, body(model_dir), args, work, model="linear model")
    base = results.get("mlflow") or {}
    for key, label in PROCESSES if base else ():
        r = results[key][c]
        rec(f"serve.linear.rps (TF-IDF + logistic regression, {label}, c={c}, 1 row)", r["rps"], "req/s",
            baseline=f"mlflow models serve --env-manager local of the same pyfunc, best variant: "
            f"{base['variant']} ({note(base)})", baseline_value=base["rps"], goal="≥ 10× MLflow's req/s")
        rec(f"serve.linear.p99 ({label}, c={c})", r["p99_ms"], "ms", baseline="mlflow models serve p99",
            baseline_value=base["p99_ms"], higher_is_better=False)
    record_high(rec, "linear TF-IDF + logistic regression", results, c)


if __name__ == "__main__":
    main()
