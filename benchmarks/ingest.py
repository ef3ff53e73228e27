"""Ingest into an S3 endpoint (moto server) against a raw pyarrow write of the same Parquet, and peak RSS.

Throughput: the sample (`lifecycle.sample.generate_tickets`) is generated once per size and written as
a local CSV (and as a local Parquet file of the normalised table). Then, best of `--repeat` rounds (each
round runs every side once, so the sides share the machine's noise), each run timed alone:

- `raw write`: `pyarrow.parquet.write_table` of the normalised table (already in memory) to
  `pyarrow.fs.S3FileSystem` — the baseline: bytes on the wire and nothing else.
- `raw csv pipeline`: a hand-written streaming CSV → Parquet on S3 with pyarrow (open_csv + ParquetWriter),
  the same input work as ingest without hashing, the audit or the Delta commit.
- `ingest csv` / `ingest parquet`: `tasks.ingest.ingest_dataset` from the local CSV / Parquet into an
  `ObjectStore` on the same endpoint (a fresh prefix each time, so no run is a no-op). Ingest is
  write + audit (GX on the new files, tasks/audit.py) + commit; the csv side also records its time less
  the audit's (`audit excluded`), the best over its rounds, so the audit's share shows.

- `parse`, `hash`, `audit`: the CSV read, the content hash and the GX audit alone, for the CPU accounting
  (`cpu_accounting`): CPU seconds of every side, this process and the S3 server's, and the ratio an
  ingest could reach at best on this machine's cores.

- `--before FILE`: also `ingest csv` with another revision's tasks/ingest.py
  (`git show REV:tasks/ingest.py > FILE`), for before/after figures from one run.

Every rate is the raw write's Parquet bytes over the run's wall time, so a ratio is a time ratio. The moto
server runs in its own process; what a run wrote is deleted after it (untimed) to bound its memory.
10M rows are 1M generated rows tiled with fresh ids (the generator is a Python loop: ~60 s per 1M rows
here); the content differs only in ids.

Memory (`--memory-mb N`): a CSV of about N MB is ingested into a file lake in a subprocess (ingest audits
the landing's files with the validation suite before it commits them, so this is ingest + validate), and
its peak RSS (VmHWM) is compared with the same subprocess ingesting the 600-row sample.

    python -m benchmarks.ingest [--rows 1000000 10000000] [--repeat 3] [--memory-mb 2048] [--before FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import record

KEY, SECRET, BUCKET = "bench", "bench-secret", "bench"
BASE_ROWS = 1_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    """A moto S3 server in its own process (so it does not share the benchmark's GIL), with one bucket."""
    import boto3

    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                          region_name="us-east-1")
    for _ in range(100):
        try:
            client.create_bucket(Bucket=BUCKET)
            return proc, endpoint
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def write_csv(path: Path, rows: int, first_id: int = 1) -> None:
    """`rows` sample tickets as CSV, ids from `first_id`: generated up to 1M, tiled beyond that with fresh ids."""
    from lifecycle.sample import generate_tickets

    frame = generate_tickets(min(rows, BASE_ROWS))
    rest = frame.drop(columns=["ticket_id"]).to_csv(header=False, index=False).splitlines(keepends=True)
    with path.open("w") as f:
        f.write("ticket_id," + ",".join(frame.columns.drop("ticket_id")) + "\n")
        written = 0
        while written < rows:
            n = min(len(rest), rows - written)
            f.write("".join(f"{first_id + written + i},{line}" for i, line in enumerate(rest[:n])))
            written += n


def tickets_spec(source: str):
    from lifecycle.sample import SAMPLE_SPEC
    from lifecycle.spec import parse_spec

    return parse_spec({**SAMPLE_SPEC, "source": source})


def load_ingest(module_path: str):
    """`ingest_dataset` of another revision's tasks/ingest.py (for before/after)."""
    spec = importlib.util.spec_from_file_location("bench_ingest_before", module_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.ingest_dataset


def raw_csv_pipeline(csv: Path, spec, pafs, path: str | None) -> None:
    """The hand-written baseline: stream the CSV with the spec's column types into one Parquet object
    (with no `path`: read the CSV only)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from tasks.sources import target_schema

    types = {f.name: f.type for f in target_schema(spec, pa.int64())}
    reader = pacsv.open_csv(csv, convert_options=pacsv.ConvertOptions(column_types=types,
                                                                       include_columns=spec.required_columns))
    if path is None:
        for _batch in reader:
            pass
        return
    with pq.ParquetWriter(path, reader.schema, filesystem=pafs) as writer:
        for batch in reader:
            writer.write_batch(batch)


@contextlib.contextmanager
def timed_audit(spent: list[float]):
    """Time every GX run (tasks.audit.FileChecks.check, inside the write loop) and the rest of the audit
    (tasks.ingest.audit_files) of an ingest into `spent`."""
    import tasks.audit as audit_module
    import tasks.ingest as ingest_module

    def timing(real):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - t0)
        return timed

    real_audit, real_check = ingest_module.audit_files, audit_module.FileChecks.check
    ingest_module.audit_files, audit_module.FileChecks.check = timing(real_audit), timing(real_check)
    try:
        yield
    finally:
        ingest_module.audit_files, audit_module.FileChecks.check = real_audit, real_check


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of this process (every thread) or of process `pid` (from /proc)."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@dataclass
class Run:
    """One timed run of a side: wall seconds, and CPU seconds of this process and of the S3 server."""

    wall: float = float("inf")
    cpu: float = 0.0
    server_cpu: float = 0.0

    @property
    def busy_cores(self) -> float:
        return (self.cpu + self.server_cpu) / self.wall


def interleaved_best(repeat: int, sides: dict, server_pid: int | None = None) -> dict[str, Run]:
    """The fastest run of each side over `repeat` rounds; a side returns a cleanup, run untimed after it."""
    best = {name: Run() for name in sides}
    for _ in range(repeat):
        for name, fn in sides.items():
            c0, s0 = cpu_seconds(), cpu_seconds(server_pid) if server_pid else 0.0
            t0 = time.perf_counter()
            cleanup = fn()
            wall = time.perf_counter() - t0
            if wall < best[name].wall:
                best[name] = Run(wall, cpu_seconds() - c0, (cpu_seconds(server_pid) - s0) if server_pid else 0.0)
            cleanup()
    return best


def throughput(rows: int, repeat: int, workdir: Path, endpoint: str, server_pid: int, before=None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from infra_blocks import ObjectStore
    from tasks.ingest import ingest_dataset
    from tasks.sources import read_source

    csv = workdir / f"tickets-{rows}.csv"
    t0 = time.perf_counter()
    if not csv.exists():
        write_csv(csv, rows)
    print(f"{rows} rows: CSV {csv.stat().st_size / 1e6:.0f} MB ready in {time.perf_counter() - t0:.0f} s", flush=True)

    store = ObjectStore(url=f"s3://{BUCKET}/raw", endpoint_url=endpoint, region="us-east-1", access_key_id=KEY,
                        secret_access_key=SECRET)
    spec = tickets_spec(str(csv))
    table = pa.concat_tables(t for _, t in read_source(store, spec))  # the normalised table ingest writes
    local_parquet = workdir / f"tickets-{rows}.parquet"
    pq.write_table(table, local_parquet)
    pafs = store.pyarrow_filesystem()
    key = f"raw-size-{uuid.uuid4().hex}.parquet"
    pq.write_table(table, store.path(key), filesystem=pafs)
    size = pafs.get_file_info(store.path(key)).size
    store.delete(key)

    def raw_write():
        key = f"raw-{uuid.uuid4().hex}.parquet"
        pq.write_table(table, store.path(key), filesystem=pafs)
        return lambda: store.delete(key)

    def raw_pipeline():
        key = f"pipe-{uuid.uuid4().hex}.parquet"
        raw_csv_pipeline(csv, spec, pafs, store.path(key))
        return lambda: store.delete(key)

    def parse_only():  # the CSV read alone: the work any CSV ingest adds to the raw write
        raw_csv_pipeline(csv, spec, None, None)
        return lambda: None

    def hash_only():  # the content hash alone (the identity of what was ingested)
        from lifecycle.streaming import ContentHash

        ContentHash().update(table)
        return lambda: None

    def audit_only():  # the GX audit alone, on the rows in memory, in the batches ingest runs
        from tasks.audit import FileChecks

        with tempfile.TemporaryDirectory(prefix="bench-docs-") as docs:
            checks = FileChecks(spec, "tickets@bench", docs)
            for batch in table.to_batches(max_chunksize=250_000):
                checks.add(pa.Table.from_batches([batch]))
                checks.end_file()
            checks.finish()
            assert checks.success
        return lambda: None

    audited: list[float] = []  # per csv run: its wall time less the audit's (write + commit)

    def ingest_from(source: Path, fn=ingest_dataset, split: bool = False):
        def run():
            lake = store.model_copy(update={"url": f"s3://{BUCKET}/lake-{uuid.uuid4().hex[:8]}"})
            t0, spent = time.perf_counter(), []
            with timed_audit(spent) if split else contextlib.nullcontext():
                version = fn(lake, spec.model_copy(update={"source": str(source)}))
            if split:
                audited.append(time.perf_counter() - t0 - sum(spent))
            assert version.rows == rows
            return lambda: lake.delete("")
        return run

    sides = {"raw": raw_write, "parse": parse_only, "hash": hash_only, "audit": audit_only, "pipeline": raw_pipeline,
             "csv": ingest_from(csv, split=True),
             "parquet": ingest_from(local_parquet)}
    if before is not None:
        sides["csv_before"] = ingest_from(csv, before)
    runs = interleaved_best(repeat, sides, server_pid)
    best = {name: run.wall for name, run in runs.items()}
    table = None  # the closures' table: freed before the figures are written

    mb = size / 1e6
    tag = f"{rows // 1_000_000}M rows" if rows >= 1_000_000 else f"{rows} rows"
    raw_name = "raw pyarrow S3FileSystem write of the same Parquet"
    pipe_name = "hand-written pyarrow CSV -> S3 Parquet stream"
    rate = {name: mb / t for name, t in best.items()}
    record(f"ingest.raw_write ({tag})", rate["raw"], "MB/s")
    record(f"ingest.raw_csv_pipeline ({tag})", rate["pipeline"], "MB/s", baseline=raw_name, baseline_value=rate["raw"])
    record(f"ingest.csv_to_s3 ({tag})", rate["csv"], "MB/s", baseline=raw_name, baseline_value=rate["raw"],
           goal=">= 0.9x")
    record(f"ingest.parquet_to_s3 ({tag})", rate["parquet"], "MB/s", baseline=raw_name, baseline_value=rate["raw"],
           goal=">= 0.9x")
    record(f"ingest.csv_to_s3 ({tag}, audit excluded: write + commit)", mb / min(audited), "MB/s", baseline=raw_name,
           baseline_value=rate["raw"], goal="reported: the share of ingest that is not the audit")
    record(f"ingest.csv_to_s3_vs_raw_csv_pipeline ({tag})", rate["csv"], "MB/s", baseline=pipe_name,
           baseline_value=rate["pipeline"], goal=">= 0.9x")
    if before is not None:
        record(f"ingest.csv_to_s3 ({tag}, before)", rate["csv_before"], "MB/s", baseline=raw_name,
               baseline_value=rate["raw"], goal=">= 0.9x")
    cpu_accounting(tag, runs)
    print(f"  {mb:.0f} MB Parquet: " + "  ".join(
        f"{name} {r.wall:.2f}s ({r.cpu:.1f}+{r.server_cpu:.1f} CPU s)" for name, r in runs.items()), flush=True)


def cpu_accounting(tag: str, runs: dict[str, Run]) -> None:
    """Where the time goes, in CPU seconds (this process + the S3 server), and the best ratio to the raw
    write that an ingest could reach on this machine: a run's wall time is at least its CPU seconds
    over the cores. Any CSV ingest does at least the raw write's work plus the CSV read; this one also
    hashes the rows (the identity of what was ingested) and runs the GX audit before it commits."""
    cores = os.cpu_count() or 1
    for name, label in (("raw", "raw write"), ("parse", "CSV read alone"), ("hash", "content hash alone"),
                        ("audit", "GX audit alone"), ("pipeline", "raw csv pipeline"), ("csv", "ingest csv"),
                        ("parquet", "ingest parquet")):
        run = runs[name]
        record(f"ingest.cpu_seconds ({tag}, {label})", run.cpu + run.server_cpu, "CPU s",
               goal=f"reported: {run.busy_cores:.2f} of {cores} cores busy over {run.wall:.2f} s wall "
                    f"(S3 server {run.server_cpu:.1f} CPU s)", higher_is_better=False)
    raw = runs["raw"]
    for what, extra in (("any CSV ingest", ("parse",)), ("with the hash and the GX audit", ("parse", "hash", "audit"))):
        need = raw.cpu + raw.server_cpu + sum(runs[n].cpu for n in extra)
        floor = max(raw.wall, need / cores)
        record(f"ingest.csv_ceiling_vs_raw_write ({tag}, {what})", raw.wall / floor, "x", goal=(
            f"reported: the most it can reach here: raw write {raw.wall:.2f} s over max(that, "
            f"{need:.2f} CPU s / {cores} cores); the goal is >= 0.9x"))


# Peak RSS from VmHWM: Linux carries getrusage's ru_maxrss across execve (a child started from a big
# parent reports the parent's size), while VmHWM belongs to the new process's own address space.
PEAK_SCRIPT = """
import json, sys
from lifecycle.sample import SAMPLE_SPEC
from lifecycle.spec import parse_spec
from infra_blocks import ObjectStore
from tasks.ingest import ingest_dataset
version = ingest_dataset(ObjectStore(url="file://" + sys.argv[2]), parse_spec({**SAMPLE_SPEC, "source": sys.argv[1]}))
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"rows": version.rows, "peak_rss_mb": int(hwm.split()[1]) / 1024}))
"""


def peak_rss(csv: Path, workdir: Path) -> dict:
    """Ingest `csv` into a fresh file lake in a subprocess; its row count and peak RSS in MB."""
    lake = workdir / f"lake-{uuid.uuid4().hex[:8]}"
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(csv), str(lake)], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent)
    shutil.rmtree(lake, ignore_errors=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory(target_mb: int, workdir: Path) -> None:
    from lifecycle.sample import write_sample

    small_csv, _ = write_sample(workdir / "small", rows=600)
    big = workdir / f"big-{target_mb}mb.csv"
    if not big.exists():
        write_csv(big, int(target_mb * 1e6 / 93))  # ~93 bytes a row
    size_mb = big.stat().st_size / 1e6
    base = peak_rss(small_csv, workdir)
    t0 = time.perf_counter()
    peak = peak_rss(big, workdir)
    seconds = time.perf_counter() - t0
    print(f"  {size_mb:.0f} MB CSV ({peak['rows']} rows) in {seconds:.0f} s: peak RSS {peak['peak_rss_mb']:.0f} MB "
          f"(600-row sample: {base['peak_rss_mb']:.0f} MB)", flush=True)
    record(f"ingest.peak_rss ({size_mb:.0f} MB CSV)", peak["peak_rss_mb"], "MB",
           baseline="same process ingesting the 600-row sample", baseline_value=base["peak_rss_mb"],
           higher_is_better=False, goal="a 5 GB CSV ingested and validated within 2 GB peak RSS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[1_000_000, 10_000_000])
    parser.add_argument("--repeat", type=int, default=3, help="Best of this many rounds of every side.")
    parser.add_argument("--memory-mb", type=int, default=0, help="Also measure peak RSS on a CSV this large.")
    parser.add_argument("--before", help="Another revision's tasks/ingest.py, timed beside this one.")
    parser.add_argument("--workdir", help="Keep generated CSVs here between runs (default: a temp dir).")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-ingest-"))
    workdir.mkdir(parents=True, exist_ok=True)
    before = load_ingest(args.before) if args.before else None
    if args.rows:
        proc, endpoint = start_moto()
        try:
            for rows in args.rows:
                throughput(rows, args.repeat, workdir, endpoint, proc.pid, before)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    if args.memory_mb:
        memory(args.memory_mb, workdir)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    main()
