"""`lifecycle` command line: run the DAG, look at what it produced, manage blocks and servers.

Heavy modules (prefect, mlflow, torch) are imported inside commands, after the process environment
is prepared, so `lifecycle --help` is instant and settings take effect.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.console import RichObserver, console, fail, filtered_stderr, prepare_env
from cli.gc import gc
from cli.models import promote, registered_fact, rollback, trained_fact
from cli.server import notify, register, up
from cli.stopping import ends_on_stop
from lifecycle.errors import LifecycleError
from lifecycle.records import ModelVersion, TrainedModel

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Run and inspect the ML lifecycle.")
blocks_app = typer.Typer(no_args_is_help=True, help="Block documents of a profile.")
app.add_typer(blocks_app, name="blocks")


@contextmanager
def _prefect_for_run() -> Iterator[None]:
    """Where this run is recorded: the Prefect server Prefect is told of (PREFECT_API_URL with a value, in
    the environment or in Prefect's profile or config); else the server of `lifecycle up` when one
    answers; else a temporary server of our own for this run (cli/stopping.py says why not Prefect's).

    The chain's event triggers match only runs tagged `lifecycle-chain`, so a run recorded on `up`'s
    server never starts a second chain on that server's worker.
    """
    from prefect.settings import PREFECT_API_URL

    from cli.server import api_context, up_server_for_run
    from cli.servers import run_server
    from infra_blocks.profiles import lifecycle_home

    if os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value():
        yield
        return
    home = lifecycle_home()
    url = up_server_for_run(home)
    if url is not None:
        console.print(f"[dim]Prefect: recording this run on {url.removesuffix('/api')} (lifecycle up)[/]")
        with api_context(url):
            yield
        return
    with run_server(home) as url, api_context(url):
        yield


def _default_spec(rows: int) -> Path:
    """The bundled sample's spec. Its file is a whole new snapshot whenever `--rows` changes, so it
    replaces the table instead of appending ids the table already has."""
    import yaml

    from infra_blocks.profiles import lifecycle_home
    from lifecycle.sample import write_sample

    path = write_sample(lifecycle_home() / "sample", rows=rows)[1]
    spec = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**spec, "ingest": {"mode": "replace"}}, sort_keys=False))
    return path


@app.command()
def run(
    spec: Optional[Path] = typer.Option(None, "--spec", help="Dataset spec YAML (default: the bundled sample)."),
    profile: str = typer.Option("local", help="Profile in deployments/profiles or a YAML path."),
    rows: int = typer.Option(5000, help="Rows of the bundled sample (ignored with --spec)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Prefect's logs on the console."),
) -> None:
    """Run the whole lifecycle and leave the model answering on 127.0.0.1.

    With `lifecycle up` running (and PREFECT_API_URL unset), the run is recorded on its Prefect server
    and shows in its UI; otherwise on a temporary server started for this run (~4 s more).
    Ctrl-C or SIGTERM stops it within seconds: one line names the stage, the exit code is 128 + the
    signal, and the next run resumes from the stages that finished.
    """
    prepare_env(verbose)
    observer: RichObserver | None = None

    def stopped_where() -> str:
        where = f"during {observer.current}" if observer and observer.current else "before the first stage"
        return f"{where}; `lifecycle run` again resumes from the stages that finished"

    try:
        with ends_on_stop(stopped_where):
            from flows.lifecycle import lifecycle_with_targets
            from infra_blocks.profiles import load_profile
            from lifecycle import progress
            from lifecycle.spec import load_spec

            dataset_spec = load_spec(spec or _default_spec(rows))
            targets = load_profile(profile)
            with filtered_stderr(), _prefect_for_run(), console.status("starting…") as status:
                observer = RichObserver(status)
                restore = progress.set_observer(observer)
                try:
                    result = lifecycle_with_targets(dataset_spec, targets)
                finally:
                    restore()
    except LifecycleError as exc:
        fail(exc)
    finally:
        from infra_blocks.dask_compute import close_local_clusters

        close_local_clusters()
    _print_summary(result, targets, dataset_spec.text_column)


def _print_summary(result, targets, text_column: str | None) -> None:
    needs_token = targets.serving.api_token is not None
    table = Table(title=f"lifecycle: {result.dataset.dataset}  ({result.seconds:.1f}s)", show_lines=False)
    table.add_column("stage")
    table.add_column("status")
    table.add_column("result")
    table.add_column("seconds", justify="right")
    v = result.validation
    facts = {
        "ingest": f"version {result.dataset.id} · {result.dataset.rows} rows",
        "validate": f"{'passed' if v.success else 'FAILED'} · {v.evaluated} expectations",
        "embed": (f"{result.embeddings.id} · {result.embeddings.rows} × {result.embeddings.dim}"
                  if result.embeddings else ""),
        "index": (f"{result.index.table}@v{result.index.table_version} · {result.index.index_type} · "
                  f"recall@{result.index.k} {result.index.recall_at_k:.3f}") if result.index else "",
        "train": trained_fact(result.trained),
        "register": registered_fact(result.model, decision=True),
        "deploy": (f"{result.deployment.endpoint} (model v{result.deployment.model_version})"
                   if result.deployment else ""),
    }
    for stage in result.stages:
        table.add_row(stage.stage, stage.status, facts.get(stage.stage, ""), f"{stage.seconds:.2f}")
    console.print(table)
    if result.deployment:
        ep = result.deployment.endpoint
        auth = ' -H "Authorization: Bearer $LIFECYCLE_API_TOKEN"' if needs_token else ""
        request, query = _write_example_request(result, targets.store, text_column if result.index else None)
        console.print(f"[bold]Query:[/]  curl -s{auth} {ep}/invocations -H 'Content-Type: application/json' "
                      f"-d @{request}", soft_wrap=True, highlight=False)
        if query:
            body = shlex.quote(json.dumps({"query": query, "k": 3}))
            console.print(f"        curl -s{auth} {ep}/search -H 'Content-Type: application/json' -d {body}",
                          soft_wrap=True, highlight=False, markup=False)
            dataset = "" if result.dataset.dataset == "tickets" else f" --dataset {result.dataset.dataset}"
            console.print(f"        lifecycle search {shlex.quote(query)}{dataset}", soft_wrap=True, highlight=False,
                          markup=False)
        console.print("[bold]Stop:[/]   lifecycle down")


def example_query(texts: list[str], words: int = 6) -> str | None:
    """A search hint drawn from the user's own text column: the first words of the first non-empty text."""
    for text in texts:
        picked = " ".join(str(text).split()[:words])
        if picked:
            return picked[:120]
    return None


def _write_example_request(result, store, text_column: str | None) -> tuple[str, str | None]:
    """Write a ready-to-send /invocations payload (the dataset's first rows) under LIFECYCLE_HOME.

    Returns:
        The payload's path as the query hint shows it (relative when below the current folder), and a
        search query drawn from the dataset's text column (None without one or without an index).
    """
    from infra_blocks.profiles import lifecycle_home

    path = (lifecycle_home() / "sample" / "request.json").resolve()
    query = None
    try:
        from tasks.lake import read_dataset

        frame = read_dataset(store, result.dataset).head(20)
        payload = {"dataframe_split": json.loads(frame.head(2).to_json(orient="split", index=False))}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload))
        if text_column and text_column in frame:
            query = example_query(frame[text_column].dropna().tolist())
    except Exception:  # noqa: BLE001 - a convenience file; never fail a finished run over it
        pass
    try:
        return str(path.relative_to(Path.cwd().resolve())), query
    except ValueError:
        return str(path), query


@app.command()
def status(profile: str = typer.Option("local", help="Profile.")) -> None:
    """The latest record of every stage for each dataset, and whether the endpoint answers."""
    prepare_env()
    try:
        from infra_blocks.profiles import load_profile
        from lifecycle.records import RECORD_TYPES, parse_record

        targets = load_profile(profile)
        store = targets.store
        datasets = sorted({k.split("/")[2] for k in store.list_keys("records/latest")})
        if not datasets:
            console.print("nothing has run yet: try `lifecycle run`")
            return
        table = Table(title=f"lifecycle status ({store.url})")
        for col in ("dataset", "stage", "id", "created", "detail"):
            table.add_column(col)
        for name in datasets:
            for kind, cls in RECORD_TYPES.items():
                key = f"records/latest/{name}/{kind}.json"
                if store.exists(key):
                    rec = parse_record(cls, store.read_bytes(key))
                    table.add_row(name, kind, rec.id, rec.created_at.strftime("%Y-%m-%d %H:%M:%S"), _detail(rec))
        console.print(table)
        console.print(f"endpoint {targets.serving.endpoint}: {_health(targets.serving.endpoint)}")
    except LifecycleError as exc:
        fail(exc)


def _detail(rec) -> str:
    if isinstance(rec, TrainedModel):
        return trained_fact(rec)
    if isinstance(rec, ModelVersion):
        return registered_fact(rec)
    for attr in ("status", "decision", "recall_at_k", "rows", "success"):
        if hasattr(rec, attr):
            return f"{attr}={getattr(rec, attr)}"
    return ""


def _health(endpoint: str) -> str:
    import httpx

    try:
        return httpx.get(f"{endpoint}/health", timeout=2).text
    except httpx.HTTPError:
        return "not answering"


@app.command()
def lineage(dataset: str = typer.Argument("tickets"), profile: str = typer.Option("local")) -> None:
    """The chain of records behind what is deployed (or the latest model) for a dataset."""
    prepare_env()
    try:
        from infra_blocks.profiles import load_profile
        from lifecycle.records import RECORD_TYPES, parse_record

        store = load_profile(profile).store
        start = None
        for kind in ("deployment", "model_version"):
            key = f"records/latest/{dataset}/{kind}.json"
            if store.exists(key):
                start = parse_record(RECORD_TYPES[kind], store.read_bytes(key))
                break
        if start is None:
            raise LifecycleError(f"dataset {dataset!r}: no records yet")
        _print_lineage(store, start, 0)
    except LifecycleError as exc:
        fail(exc)


def _print_lineage(store, record, depth: int) -> None:
    from lifecycle.records import RECORD_TYPES, parse_record, record_key

    console.print(f"{'  ' * depth}{record.kind} [bold]{record.id}[/] ({record.created_at:%Y-%m-%d %H:%M})")
    for kind, rid in record.inputs.items():
        cls = RECORD_TYPES.get(kind)
        if cls and store.exists(record_key(cls, rid)):
            _print_lineage(store, parse_record(cls, store.read_bytes(record_key(cls, rid))), depth + 1)


@app.command()
def search(
    query: str = typer.Argument(..., help="Text to search for."),
    dataset: str = typer.Option("tickets", help="Dataset whose index to search."),
    k: int = typer.Option(5, help="Rows to return."),
    where: Optional[str] = typer.Option(None, help="SQL filter on metadata, e.g. \"category = 'billing'\"."),
    profile: str = typer.Option("local"),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per row (for scripts)."),
) -> None:
    """Search the latest index of a dataset with a text query."""
    prepare_env()
    try:
        from infra_blocks.profiles import load_profile
        from lifecycle.records import IndexVersion
        from lifecycle.search import Searcher
        from tasks.records import latest_record

        targets = load_profile(profile)
        record = latest_record(targets.store, IndexVersion, dataset)
        if record is None:
            raise LifecycleError(f"dataset {dataset!r}: no index yet; run `lifecycle run`")
        rows = Searcher.from_record(record, targets.vectors).search(query, k=k, where=where)
    except LifecycleError as exc:
        fail(exc)
    if as_json:
        import json

        for row in rows:
            typer.echo(json.dumps(row, default=str))
        return
    # Short columns keep their full width; the text gets what is left of the terminal, cut with "…".
    meta = list(rows[0]["metadata"]) if rows else []
    cells = [[str(r["id"]), *(str(r["metadata"][c]) for c in meta), f"{r['_distance']:.4f}"] for r in rows]
    table = Table(title=f"{query!r} in {record.table}@{record.tag}")
    widths = []
    for i, col in enumerate(("id", *meta, "distance")):
        widths.append(max([len(col), *(len(c[i]) for c in cells)]))
        table.add_column(col, no_wrap=True, min_width=widths[-1], justify="right" if col == "distance" else "left")
    left = max(10, console.width - sum(widths) - 3 * len(widths) - 4)
    table.add_column("text", no_wrap=True, overflow="ellipsis", max_width=left)
    for row, short in zip(rows, cells):
        table.add_row(*short, str(row["text"]))
    console.print(table)


@app.command()
def down(profile: str = typer.Option("local")) -> None:
    """Stop the serving process this profile started, and what `lifecycle up` started (by recorded PIDs)."""
    prepare_env()
    from cli.server import stop_started
    from infra_blocks.profiles import lifecycle_home

    for name in stop_started(lifecycle_home()):  # what `lifecycle up` started, even if the profile is broken
        console.print(f"stopped {name}")
    try:
        from infra_blocks.profiles import load_profile
        from tasks.serving import stop_current

        stopped = stop_current(load_profile(profile).serving)
    except LifecycleError as exc:
        fail(exc)
    if stopped:
        console.print(f"stopped deployment {stopped.deployment_id} ({stopped.summary}) "
                      f"on {stopped.host}:{stopped.port}")
    else:
        console.print("nothing was serving")


@app.command()
def sample(out: Path = typer.Option(Path("sample"), help="Folder to write into."),
           rows: int = typer.Option(5000, help="Rows to generate.")) -> None:
    """Write the bundled sample CSV and its spec (a starting point for your own spec)."""
    from lifecycle.sample import write_sample

    csv_path, spec_path = write_sample(out, rows=rows)
    console.print(f"wrote {csv_path} and {spec_path}")


@blocks_app.command("apply")
def blocks_apply(profile: str = typer.Option("local", help="Profile to apply.")) -> None:
    """Create or update the profile's five block documents on the Prefect API."""
    prepare_env()
    try:
        from infra_blocks.profiles import apply_profile

        names = apply_profile(profile)
    except LifecycleError as exc:
        fail(exc)
    for role, name in names.items():
        console.print(f"  {role:<8} → {name}")


# The orchestration commands (cli/server.py) and the champion commands (cli/models.py).
app.command()(up)
app.command()(notify)
app.command()(register)


app.command()(promote)
app.command()(rollback)
app.command()(gc)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
