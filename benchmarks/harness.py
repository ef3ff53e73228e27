"""The benchmark harness every benchmark uses.

Each benchmark calls `record()` once per figure; figures are appended as JSON lines to
`benchmarks/results.jsonl` with the machine and date, and `benchmarks/report.py` renders
`BENCHMARKS.md` from that file. Ratios compare figures measured side by side in the same run.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results.jsonl"


def machine() -> str:
    """A short description of the machine the figures came from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    gpu = os.environ.get("LIFECYCLE_BENCH_GPU", "no GPU")
    return f"{os.cpu_count()} cores ({cpu}){mem}, {gpu}, Python {platform.python_version()}"


def record(
    name: str,
    value: float,
    unit: str,
    *,
    baseline: str | None = None,
    baseline_value: float | None = None,
    goal: str | None = None,
    higher_is_better: bool = True,
    results: Path = RESULTS,
) -> dict:
    """Append one figure. `ratio` is value/baseline_value for rates and baseline/value for times."""
    ratio = None
    if baseline_value:
        ratio = value / baseline_value if higher_is_better else baseline_value / value if value else None
    row = {
        "name": name,
        "value": round(value, 6),
        "unit": unit,
        "baseline": baseline,
        "baseline_value": None if baseline_value is None else round(baseline_value, 6),
        "ratio": None if ratio is None else round(ratio, 4),
        "goal": goal,
        "machine": machine(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    results.parent.mkdir(parents=True, exist_ok=True)
    with results.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{name}: {value:.4g} {unit}" + (f"  (ratio {row['ratio']} vs {baseline})" if ratio else ""))
    return row


def record_incremental(stages: str, tag: str, fraction: float, append_s: float, cold_s: float, *,
                       variant: str = "", results: Path = RESULTS) -> dict:
    """`<stages>.incremental (<tag>, <fraction> append)`: append seconds against the same stages cold on
    the whole table, measured in one run; ratio = append / cold (the goal: at most 5 %)."""
    return record(f"{stages}.incremental ({tag}, {fraction:.0%} append{variant})", append_s, "s",
                  baseline=f"{stages.replace('+', ' + ')} of the whole {tag} cold, same run", baseline_value=cold_s,
                  goal="ratio = append / cold <= 5 %", results=results)
