"""`lifecycle up`, `notify` and `register`: the orchestration surface on a self-hosted Prefect server.

`up` does what a user would do by hand, in one command: start `prefect server` and an MLflow server on
127.0.0.1 (SQLite under LIFECYCLE_HOME, or PostgreSQL URLs for production), create the work pools,
save the profile's blocks, register the sample spec for the landing zone, `prefect deploy --all`, and
start a process worker. Every process gets its own process group and is recorded (PID and start time)
in `LIFECYCLE_HOME/up.json`; `lifecycle down` stops those groups and nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import BaseModel

from cli.console import console, fail, prepare_env
from cli.servers import REPO, executable, prefect_env, start_mlflow_server, start_prefect_server, start_worker
from lifecycle.errors import LifecycleError
from tasks.processes import Started, is_running, stop_process, wait_http

POOLS = {
    "lifecycle-process": ("process", None),
    "lifecycle-docker-gpu": ("docker", REPO / "deployments" / "work_pools" / "docker-gpu.json"),
    "lifecycle-k8s-gpu": ("kubernetes", REPO / "deployments" / "work_pools" / "kubernetes-gpu.json"),
}
STATE_FILE = "up.json"


class UpState(BaseModel):
    profile: str
    prefect_url: str
    mlflow_url: str | None = None
    processes: list[Started]


def create_work_pools(names: list[str] | None = None) -> list[str]:
    """Create the lifecycle work pools that do not exist yet (current PREFECT_API_URL); returns those created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    created = []
    with get_client(sync_client=True) as client:
        for name in names or list(POOLS):
            kind, template_file = POOLS[name]
            try:
                client.read_work_pool(name)
                continue
            except ObjectNotFound:
                pass
            template = (json.loads(template_file.read_text()) if template_file
                        else ProcessWorker.get_default_base_job_template())
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type=kind, base_job_template=template))
                created.append(name)
            except ObjectAlreadyExists:
                pass
    return created


def deploy_all(api_url: str, home: Path, repo: Path = REPO, timeout_s: float = 300.0) -> str:
    """`prefect --no-prompt deploy --all` in `repo`; returns its output.

    Raises:
        LifecycleError: the command failed (its last lines are included).
    """
    env = {**prefect_env(home, api_url=api_url), "PREFECT_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.run([executable("prefect"), "--no-prompt", "deploy", "--all"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise LifecycleError(f"prefect deploy --all failed in {repo}:\n{tail}")
    return proc.stdout


@contextmanager
def api_context(api_url: str) -> Iterator[None]:
    """Point this process's Prefect client at `api_url` for the duration of a `with` block.

    Prefect's events and API-log workers are process-wide singletons that read the API URL once, when
    they start. They are drained (stopped after sending what they hold) on the way in and on the way
    out, so events emitted inside the block reach `api_url`, and events emitted after it reach the API
    that is current again, instead of a server that may be gone by then.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    _drain_prefect_workers()
    with temporary_settings({PREFECT_API_URL: api_url}):
        try:
            yield
        finally:
            _drain_prefect_workers()


def _drain_prefect_workers(timeout_s: float = 30.0) -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout_s, at_exit=False)


def read_state(home: Path) -> UpState | None:
    path = home / STATE_FILE
    return UpState.model_validate_json(path.read_text()) if path.exists() else None


def api_url_from_state() -> str | None:
    from infra_blocks.profiles import lifecycle_home

    state = read_state(lifecycle_home())
    return state.prefect_url if state else None


def running_api_url(home: Path, timeout_s: float = 2.0) -> str | None:
    """The API of the Prefect server `lifecycle up` started under `home`, if it is up and answering.

    A state file that cannot be read (being written by `up` right now, or from another version) counts
    as no server.
    """
    import httpx

    try:
        state = read_state(home)
    except (OSError, ValueError):  # pydantic's ValidationError is a ValueError
        return None
    if state is None:
        return None
    servers = [p for p in state.processes if p.name == "prefect-server"]
    if not servers or not all(is_running(p) for p in servers):
        return None
    try:
        answered = httpx.get(f"{state.prefect_url}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return None
    return state.prefect_url if answered else None


def up_server_for_run(home: Path) -> str | None:
    """Where `lifecycle run` should record its runs: `up`'s server, unless Prefect is told of another one.

    Told means PREFECT_API_URL in the environment (an empty value is Prefect's way to ask for a
    temporary server) or in the active Prefect profile or config file.
    """
    if "PREFECT_API_URL" in os.environ:
        return None
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    return running_api_url(home)


def stop_started(home: Path) -> list[str]:
    """Stop every process `up` recorded under `home`, last started first; returns the names stopped."""
    state = read_state(home)
    if state is None:
        return []
    stopped = [p.name for p in reversed(state.processes) if stop_process(p)]
    (home / STATE_FILE).unlink(missing_ok=True)
    return stopped


def register_sample(store) -> str | None:
    """Register the bundled sample spec for `landing/tickets/` unless a spec for it is registered."""
    from lifecycle.sample import SAMPLE_SPEC
    from lifecycle.spec import parse_spec
    from tasks.specs import register_spec, registered_key

    if store.exists(registered_key(str(SAMPLE_SPEC["name"]))):
        return None
    spec = parse_spec({**SAMPLE_SPEC, "source": store.uri(f"landing/{SAMPLE_SPEC['name']}")})
    return register_spec(store, spec)


def bring_up(profile: str, home: Path, host: str = "127.0.0.1", prefect_port: int = 4200, mlflow_port: int = 5000,
             prefect_db: str | None = None, mlflow_db: str | None = None, mlflow_artifacts: str | None = None,
             mlflow: bool = True, worker: bool = True, query_seconds: float = 5.0, repo: Path = REPO,
             say=lambda msg: None) -> UpState:
    """Everything `lifecycle up` does; stops what it started if a step fails.

    Args:
        profile: a profile name or a profile YAML path; its blocks are saved as `<name>-<role>` and `name`
            becomes the server's default profile.
        repo: the checkout whose prefect.yaml is deployed (flow runs start in it).
    """
    from infra_blocks.profiles import apply_profile, load_profile

    existing = read_state(home)
    if existing and all(is_running(p) for p in existing.processes):
        say(f"already up: Prefect {existing.prefect_url}")
        return existing
    if existing:
        stop_started(home)
    home.mkdir(parents=True, exist_ok=True)
    started: list[Started] = []

    def record(api_url: str, mlflow_url: str | None) -> UpState:
        state = UpState(profile=Path(profile).stem, prefect_url=api_url, mlflow_url=mlflow_url, processes=started)
        (home / STATE_FILE).write_text(state.model_dump_json(indent=2))
        return state

    try:
        server = start_prefect_server(home, host, prefect_port, prefect_db)
        started.append(server)
        api_url = server.url or f"http://{host}:{prefect_port}/api"
        mlflow_url = None
        if mlflow:
            backend = mlflow_db or f"sqlite:///{(home / 'mlflow.db').resolve()}"
            ml = start_mlflow_server(home, host, mlflow_port, backend, mlflow_artifacts)
            started.append(ml)
            mlflow_url = ml.url
        record(api_url, mlflow_url)
        wait_http(server, f"{api_url}/health")
        say(f"Prefect server  {api_url.removesuffix('/api')}")
        if mlflow:
            wait_http(started[-1], f"{mlflow_url}/health")
            say(f"MLflow server   {mlflow_url}")
        with api_context(api_url):
            from tasks.orchestration import set_default_profile

            pools = create_work_pools()
            say(f"work pools      {', '.join(POOLS)}{' (created)' if pools else ''}")
            names = apply_profile(profile)
            set_default_profile(Path(profile).stem)
            say(f"blocks          {', '.join(names.values())}")
            if register_sample(load_profile(profile).store):
                say("landing         landing/tickets/ → the sample spec")
        if not (home / "sample" / "tickets.csv").exists():  # what the nightly deployment's default spec reads
            from lifecycle.sample import write_sample

            write_sample(home / "sample")
        deploy_all(api_url, home, repo)
        say("deployments     prefect deploy --all done")
        if worker:
            started.append(start_worker(home, api_url, query_seconds=query_seconds))
            say("worker          lifecycle-process")
        return record(api_url, mlflow_url)
    except BaseException:
        for proc in reversed(started):
            stop_process(proc)
        (home / STATE_FILE).unlink(missing_ok=True)
        raise


def up(
    profile: str = typer.Option("local", help="Profile whose blocks the deployments use."),
    prefect_port: int = typer.Option(4200, help="Port of the Prefect server (UI and API)."),
    mlflow_port: int = typer.Option(5000, help="Port of the MLflow server."),
    prefect_db: Optional[str] = typer.Option(None, help="Prefect database URL, e.g. postgresql+asyncpg://…; "
                                                        "default SQLite under LIFECYCLE_HOME."),
    mlflow_db: Optional[str] = typer.Option(None, help="MLflow backend store URI, e.g. postgresql://…; "
                                                       "default LIFECYCLE_HOME/mlflow.db."),
    mlflow_artifacts: Optional[str] = typer.Option(None, help="Where the MLflow server keeps artifacts."),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="Do not start an MLflow server."),
) -> None:
    """Start a local Prefect server, MLflow, work pools, blocks, deployments and a worker (stop: `lifecycle down`)."""
    from cli.stopping import ends_on_stop
    from infra_blocks.profiles import lifecycle_home

    prepare_env()
    try:
        with ends_on_stop(lambda: "lifecycle up: what it had started is stopped"):  # bring_up cleans up
            state = bring_up(profile, lifecycle_home(), prefect_port=prefect_port, mlflow_port=mlflow_port,
                             prefect_db=prefect_db, mlflow_db=mlflow_db, mlflow_artifacts=mlflow_artifacts,
                             mlflow=not no_mlflow, say=lambda m: console.print(f"  [green]✓[/] {m}", highlight=False))
    except LifecycleError as exc:
        fail(exc)
    console.print(f"[bold]UI:[/] {state.prefect_url.removesuffix('/api')}   "
                  f"[bold]API:[/] export PREFECT_API_URL={state.prefect_url}", soft_wrap=True)
    console.print("[bold]Land data:[/] copy a CSV under the store's landing/tickets/ "
                  "(or `lifecycle notify EVENT.json`).  [bold]Stop:[/] lifecycle down", soft_wrap=True)


def _api_url_or_fail() -> str:
    from prefect.settings import PREFECT_API_URL

    url = os.environ.get("PREFECT_API_URL") or api_url_from_state() or PREFECT_API_URL.value()
    if not url:
        raise LifecycleError("no Prefect server: run `lifecycle up` or set PREFECT_API_URL")
    return url


def notify_objects(text: str, origin: str, profile: str | None) -> tuple[list[Any], list[str]]:
    """Announce the landing objects of an S3/MinIO event notification; returns (announced, skipped URIs)."""
    from tasks.landing import landed_event, notified_objects, read_notification
    from tasks.orchestration import send_events, targets_for

    notified = read_notification(text, origin)
    _, targets = targets_for(profile)
    landed, skipped = notified_objects(targets.store, notified)
    send_events([landed_event(obj) for obj in landed])
    return landed, skipped


def notify(
    file: str = typer.Argument(..., help="S3/MinIO event-notification JSON file, or - for standard input."),
    profile: Optional[str] = typer.Option(None, help="Profile whose store holds the landing zone (default: the "
                                                     "server's)."),
) -> None:
    """Announce the objects of an S3/MinIO event notification as `lifecycle.dataset.landed` events."""

    prepare_env()
    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text()
    except OSError as exc:
        fail(LifecycleError(f"{file}: cannot read ({exc.strerror})"))
    try:
        with api_context(_api_url_or_fail()):
            landed, skipped = notify_objects(text, file, profile)
    except LifecycleError as exc:
        fail(exc)
    for obj in landed:
        console.print(f"  landed {obj.uri} (dataset {obj.dataset}, etag {obj.etag})", highlight=False)
    for uri in skipped:
        console.print(f"  [yellow]skipped[/] {uri}: not under the store's landing/<dataset>/", highlight=False)


def register(
    spec: Path = typer.Argument(..., help="Dataset spec YAML to ingest this dataset's landed files with."),
    profile: Optional[str] = typer.Option(None, help="Profile whose store keeps the spec (default: the server's)."),
) -> None:
    """Register a dataset spec: files landing under landing/<name>/ are then ingested with it."""

    prepare_env()
    try:
        from lifecycle.spec import load_spec
        from tasks.orchestration import targets_for
        from tasks.specs import register_spec

        dataset_spec = load_spec(spec)
        with api_context(_api_url_or_fail()):
            _, targets = targets_for(profile)
            key = register_spec(targets.store, dataset_spec)
    except LifecycleError as exc:
        fail(exc)
    console.print(f"registered {dataset_spec.name}: {targets.store.uri(key)}; land files under "
                  f"{targets.store.uri('landing/' + dataset_spec.name)}/", highlight=False)
