"""Wall time of the whole lifecycle on the bundled sample, per stage, and Prefect's share of it.

Runs the lifecycle twice in one process against a fresh `.lifecycle` home (first run: every stage
works; second run: unchanged stages reuse their records). The stages' own work is the summed run time
of their tasks as recorded by the Prefect API; orchestration overhead is the total minus that.

    python -m benchmarks.lifecycle_wall [--rows 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from datetime import datetime, timezone

from benchmarks.harness import record


async def _task_seconds(since: datetime) -> float:
    """Summed run time of leaf task runs (not subflow wrappers) started after `since`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterStartTime,
        TaskRunFilter,
        TaskRunFilterStartTime,
    )

    async def pages(read, **kwargs):
        out, offset = [], 0
        while True:
            page = await read(limit=200, offset=offset, **kwargs)
            out += page
            if len(page) < 200:
                return out
            offset += 200

    async with get_client() as client:
        tasks = await pages(client.read_task_runs,
                            task_run_filter=TaskRunFilter(start_time=TaskRunFilterStartTime(after_=since)))
        flows = await pages(client.read_flow_runs,
                            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since)))
    wrappers = {f.parent_task_run_id for f in flows if f.parent_task_run_id}
    return sum(t.total_run_time.total_seconds() for t in tasks if t.id not in wrappers)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=5000)
    args = parser.parse_args()
    for key, value in {"HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}.items():
        os.environ.setdefault(key, value)
    home = tempfile.mkdtemp(prefix="lifecycle-bench-")
    os.environ["LIFECYCLE_HOME"] = home
    os.environ.setdefault("LIFECYCLE_SERVING_PORT", "8799")

    from flows.lifecycle import lifecycle_with_targets
    from infra_blocks.dask_compute import close_local_clusters
    from infra_blocks.profiles import load_profile
    from lifecycle.sample import write_sample
    from lifecycle.spec import load_spec
    from tasks.serving import stop_current

    spec = load_spec(write_sample(f"{home}/sample", rows=args.rows)[1])
    targets = load_profile("local")
    try:
        for label in ("first", "rerun"):
            since = datetime.now(timezone.utc)
            t0 = time.perf_counter()
            result = lifecycle_with_targets(spec, targets)
            total = time.perf_counter() - t0
            work = asyncio.run(_task_seconds(since))
            for stage in result.stages:
                record(f"lifecycle.{label}.stage.{stage.stage} ({args.rows} rows)",
                       stage.seconds, f"s ({stage.status})", higher_is_better=False)
            record(f"lifecycle.{label}.total ({args.rows} rows)", total, "s", higher_is_better=False)
            record(f"lifecycle.{label}.stages_own_work ({args.rows} rows)", work, "s", higher_is_better=False)
            # ratio = overhead / total wall: the share of the run that is orchestration, not work.
            record(f"lifecycle.{label}.orchestration_overhead ({args.rows} rows)", total - work, "s",
                   baseline="total wall", baseline_value=total, higher_is_better=True,
                   goal="small share of the total")
    finally:
        stop_current(targets.serving)
        close_local_clusters()


if __name__ == "__main__":
    main()
