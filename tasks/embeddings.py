"""Embed: the text column of a validated dataset version → 384-d vectors, on the Dask workers.

Why this shape:
- The work unit is (dataset part, row range). The client plans units from the id column alone and each
  worker reads its own slice from the store, encodes it with its cached model and writes its own
  Parquet part: no text and no vectors pass through the client, so the client stays small whatever
  the dataset size and the workers' throughput is the stage's throughput.
- Parts are written in dataset row order (`part-00000`, … follow the dataset's parts and ranges), so
  consumers can line them up with the dataset without a join; each row also carries the hash of its
  prepared text.
- Reuse: when a previous embedding set of the dataset exists, a row whose id and text hash are both
  unchanged gets its old vector copied instead of re-encoded. The client sends each unit the candidate
  (id matches) with the old hash and location; the worker, which has the new text, keeps those whose
  hash also matches. Each unit reports how many rows it actually encoded, so `encoded_rows` in the
  record is a count of real encoder work that holds across processes.
- Appends: Delta files are immutable, so when the dataset files an earlier set covered are the first
  files of this version (an `append` commit, or several), those rows and their vectors are the same.
  The new set then lists the earlier set's parts as its own first parts (referenced, not copied) and
  embeds only the files added since. Ids of an append are new by contract (the ingest audit refuses
  ids of earlier versions), so its rows are encoded without a look-up in the earlier set; a set whose
  vectors were made differently (model, encoding, text column, `max_chars`: `vectors_key`) is not
  extended. Anything else (a replace, files removed) takes the reuse path above.
"""

from __future__ import annotations

import hashlib
import io
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.logging import get_run_logger

from infra_blocks import DaskCompute, ObjectStore
from lifecycle import encoder
from lifecycle.encoder import EMBED_DIM, MODEL_NAME, prepare_texts
from lifecycle.errors import LifecycleError
from lifecycle.progress import stage_progress
from lifecycle.records import DatasetVersion, EmbeddingSet, code_version, stable_hash
from lifecycle.spec import DatasetSpec
from tasks.policies import retry_unless_user_error

ID = "id"
VECTOR = "vector"
TEXT_HASH = "text_hash"
VECTOR_TYPE = pa.list_(pa.float32(), EMBED_DIM)

Progress = Callable[[int, int], None]


def embedding_set_id(spec: DatasetSpec, dataset: DatasetVersion) -> str:
    """Record id: the dataset version, the spec parts that decide the vectors, and this code."""
    return stable_hash(dataset.id, spec.section_hash("embed", "text_column", "id_column"), _code())


def _code() -> str:
    return code_version(sys.modules[__name__], encoder)


def vectors_key(spec: DatasetSpec) -> str:
    """What decides a row's vector besides its text: sets with equal keys can share parts."""
    return stable_hash(MODEL_NAME, encoder.ENCODING_VERSION, EMBED_DIM, spec.id_column, spec.text_column,
                       spec.embed.max_chars)


def appended_parts(spec: DatasetSpec, dataset: DatasetVersion, previous: EmbeddingSet | None) -> list[str] | None:
    """The dataset files added since `previous` was embedded, when this version only appended to it."""
    if previous is None or not previous.dataset_parts or previous.vectors_key != vectors_key(spec):
        return None
    n = len(previous.dataset_parts)
    if dataset.parts[:n] != previous.dataset_parts or len(dataset.parts) == n or dataset.rows <= previous.rows:
        return None
    return dataset.parts[n:]


def set_prefix(dataset: str, set_id: str) -> str:
    return f"embeddings/{dataset}/{set_id}"


def text_hashes(texts: list[str]) -> np.ndarray:
    """A stable int64 hash per prepared text and encoding version (blake2b: same in every process)."""
    salt = f"{MODEL_NAME}/{encoder.ENCODING_VERSION}".encode()
    return np.array(
        [int.from_bytes(hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=8, key=salt).digest(),
                        "little", signed=True) for t in texts],
        dtype=np.int64,
    )


def vectors_to_arrow(vectors: np.ndarray) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), EMBED_DIM)


def arrow_to_vectors(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A (n, 384) float32 array from a fixed_size_list column (zero-copy where Arrow allows)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.astype(np.float32, copy=False).reshape(-1, EMBED_DIM)


@dataclass(frozen=True)
class WorkUnit:
    """Rows [start, stop) of one dataset part, and what may be reused for them."""

    index: int
    part: str
    start: int
    stop: int
    out: str
    # Rows of the slice whose id exists in the previous set: position, old hash, old part index, old row.
    reuse_pos: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    reuse_hash: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    reuse_part: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    reuse_row: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class EncodeOptions:
    """What every unit needs besides its rows (sent once per unit; small)."""

    id_column: str
    text_column: str
    max_chars: int
    batch_size: int
    device: str
    previous_parts: tuple[str, ...] = ()


@dataclass(frozen=True)
class UnitResult:
    index: int
    key: str
    rows: int
    encoded: int


def _previous_rows(store: ObjectStore, previous: EmbeddingSet | None) -> pd.DataFrame | None:
    """id → (old text hash, old part index, old row) of a previous set; None when it cannot be reused."""
    if previous is None or previous.model != MODEL_NAME or previous.dim != EMBED_DIM:
        return None
    pafs = store.pyarrow_filesystem()
    frames = []
    try:
        for i, key in enumerate(previous.parts):
            table = pq.read_table(store.path(key), filesystem=pafs, columns=[ID, TEXT_HASH])
            frames.append(pd.DataFrame({ID: table.column(ID).to_pandas(), "hash": table.column(TEXT_HASH).to_numpy(),
                                        "part": i, "row": np.arange(table.num_rows)}))
    except (FileNotFoundError, KeyError, pa.ArrowInvalid):
        return None  # an incomplete or foreign set: encode everything rather than trust it
    if not frames:
        return None
    rows = pd.concat(frames, ignore_index=True).drop_duplicates(ID)
    return rows.set_index(ID)


MIN_UNIT_ROWS = 250  # a unit's scheduling and model-call overhead stays small beside encoding this many


def unit_rows(spec: DatasetSpec, rows: int, slots: int) -> int:
    """Rows per unit: `rows_per_task`, or fewer so that a small version (an append) still fills every
    worker thread (2,000 appended rows in one unit kept one of two workers idle), never below MIN_UNIT_ROWS."""
    return min(spec.embed.rows_per_task, max(MIN_UNIT_ROWS, -(-rows // max(1, slots))))


def worker_slots(compute: DaskCompute) -> int:
    """Worker threads of the compute target: how many units can run at once."""
    with compute.get_client(check=False) as client:
        return sum(client.nthreads().values()) or 1


def plan_units(store: ObjectStore, spec: DatasetSpec, dataset: DatasetVersion, set_id: str,
               previous: EmbeddingSet | None = None, parts: list[str] | None = None, slots: int = 1,
               rows: int | None = None) -> list[WorkUnit]:
    """Split the dataset (or `parts` of it, holding `rows`) into units (`unit_rows`), each with its reuse candidates.

    Only the id column is read here (8 bytes a row for int ids), never the text or vectors.
    """
    prev = _previous_rows(store, previous)
    pafs = store.pyarrow_filesystem()
    prefix = set_prefix(spec.name, set_id)
    units: list[WorkUnit] = []
    step = unit_rows(spec, dataset.rows if rows is None else rows, slots)
    for part in dataset.parts if parts is None else parts:
        ids = pq.read_table(store.path(part), filesystem=pafs, columns=[spec.id_column]).column(0).to_pandas()
        for start in range(0, len(ids), step):
            stop = min(start + step, len(ids))
            extra = {}
            if prev is not None:
                found = prev.index.get_indexer(pd.Index(ids.iloc[start:stop]))
                pos = np.flatnonzero(found >= 0)
                hit = prev.iloc[found[pos]]
                extra = dict(reuse_pos=pos.astype(np.int64), reuse_hash=hit["hash"].to_numpy(np.int64),
                             reuse_part=hit["part"].to_numpy(np.int64), reuse_row=hit["row"].to_numpy(np.int64))
            out = f"{prefix}/part-{len(units):05d}.parquet"
            units.append(WorkUnit(index=len(units), part=part, start=start, stop=stop, out=out, **extra))
    return units


def read_slice(store: ObjectStore, key: str, columns: list[str], start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of a Parquet object, reading only the row groups that hold them."""
    pf = pq.ParquetFile(store.path(key), filesystem=store.pyarrow_filesystem())
    groups: list[int] = []
    first, offset = 0, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if offset < stop and offset + n > start:
            first = first if groups else offset
            groups.append(g)
        offset += n
    if not groups:
        return pf.schema_arrow.empty_table().select(columns)
    return pf.read_row_groups(groups, columns=columns).slice(start - first, stop - start)


def _worker_threads() -> int | None:
    try:
        from distributed import get_worker

        return get_worker().state.nthreads
    except (ImportError, ValueError):
        return None


def embed_unit(unit: WorkUnit, store: ObjectStore, opts: EncodeOptions) -> UnitResult:
    """Embed one unit on a worker: read the slice, reuse what is unchanged, encode the rest, write.

    Runs wherever Dask puts it; it needs only the store block and the unit, never the client.
    """
    table = read_slice(store, unit.part, [opts.id_column, opts.text_column], unit.start, unit.stop)
    texts = prepare_texts(table.column(opts.text_column).to_pylist(), opts.max_chars)
    hashes = text_hashes(texts)
    vectors = np.zeros((len(texts), EMBED_DIM), dtype=np.float32)
    done = np.zeros(len(texts), dtype=bool)
    if len(unit.reuse_pos):
        same = hashes[unit.reuse_pos] == unit.reuse_hash
        pos, parts, rows = unit.reuse_pos[same], unit.reuse_part[same], unit.reuse_row[same]
        pafs = store.pyarrow_filesystem()
        for p in np.unique(parts):
            sel = parts == p
            old = pq.read_table(store.path(opts.previous_parts[p]), filesystem=pafs, columns=[VECTOR]).column(VECTOR)
            vectors[pos[sel]] = arrow_to_vectors(old.take(pa.array(rows[sel])))
            done[pos[sel]] = True
    todo = np.flatnonzero(~done)
    if len(todo):
        vectors[todo] = encoder.encode([texts[i] for i in todo], opts.device, opts.batch_size, _worker_threads())
    out = pa.table({ID: table.column(opts.id_column), VECTOR: vectors_to_arrow(vectors),
                    TEXT_HASH: pa.array(hashes, type=pa.int64())})
    buf = io.BytesIO()
    pq.write_table(out, buf)
    store.write_bytes(unit.out, buf.getvalue())
    return UnitResult(index=unit.index, key=unit.out, rows=len(texts), encoded=len(todo))


def run_units(compute: DaskCompute, units: list[WorkUnit], store: ObjectStore, opts: EncodeOptions,
              progress: Progress | None = None, name: str = "embed") -> list[UnitResult]:
    """Run units on the compute target's workers; results (keys and counts, no vectors) in unit order."""
    total = sum(u.rows for u in units)
    run = uuid.uuid4().hex[:8]  # a fresh key per run: Dask must not hand back a finished earlier result
    results: list[UnitResult] = []
    with compute.get_client() as client:
        from distributed import as_completed

        futures = client.map(embed_unit, units, store=store, opts=opts,
                             key=[f"embed-{name}-{run}-{u.index:05d}" for u in units])
        for future in as_completed(futures, loop=client.loop):
            results.append(future.result())
            if progress:
                progress(sum(r.rows for r in results), total)
    return sorted(results, key=lambda r: r.index)


def embed_dataset(store: ObjectStore, spec: DatasetSpec, dataset: DatasetVersion, compute: DaskCompute,
                  previous: EmbeddingSet | None = None, inputs: dict[str, str] | None = None,
                  progress: Progress | None = None) -> EmbeddingSet:
    """Embed a dataset version's text column on the compute target and return its EmbeddingSet.

    Args:
        previous: An earlier set of the same dataset: extended when this version appended to its rows,
            else its unchanged rows are copied, not re-encoded.
        inputs: Lineage for the record (the flow adds the validation report).
        progress: Called with (rows done, rows total) as units finish.

    Raises:
        LifecycleError: the spec has no text column, or the dataset lacks it.
    """
    if not spec.text_column:
        raise LifecycleError(f"spec {spec.name}: the embed stage needs `text_column`")
    for column in (spec.id_column, spec.text_column):
        if column not in dataset.schema_:
            raise LifecycleError(f"dataset {spec.name}@{dataset.id}: no column {column!r} to embed")
    began = time.perf_counter()
    set_id = embedding_set_id(spec, dataset)
    if previous is not None and previous.id == set_id:
        previous = None
    record = None
    added = appended_parts(spec, dataset, previous)
    if previous is not None and added is not None:
        record = _embed_append(store, spec, dataset, compute, previous, added, set_id, progress)
    if record is None:
        record = _embed_all(store, spec, dataset, compute, previous, set_id, progress)
    record.inputs = {"dataset": dataset.id, **(inputs or {}), **record.inputs}
    record.seconds = round(time.perf_counter() - began, 3)
    return record


def _new_set(spec: DatasetSpec, dataset: DatasetVersion, set_id: str, parts: list[str], rows: int, encoded: int,
             extends: EmbeddingSet | None = None, reused: EmbeddingSet | None = None) -> EmbeddingSet:
    return EmbeddingSet(
        id=set_id, dataset=spec.name, code_version=_code(),
        inputs={"reused_embeddings": reused.id} if reused is not None else {},
        dataset_version=dataset.id, model=MODEL_NAME, dim=EMBED_DIM, rows=rows, parts=parts, encoded_rows=encoded,
        dataset_parts=list(dataset.parts), vectors_key=vectors_key(spec), extends=extends.id if extends else None,
    )


def _options(spec: DatasetSpec, compute: DaskCompute, previous: EmbeddingSet | None) -> EncodeOptions:
    return EncodeOptions(spec.id_column, spec.text_column or "", spec.embed.max_chars, spec.embed.batch_size,
                         compute.resolved_device, tuple(previous.parts) if previous else ())


def _embed_all(store: ObjectStore, spec: DatasetSpec, dataset: DatasetVersion, compute: DaskCompute,
               previous: EmbeddingSet | None, set_id: str, progress: Progress | None) -> EmbeddingSet:
    """Every row of the version: unchanged (id, text) of `previous` copied, the rest encoded."""
    store.delete(set_prefix(spec.name, set_id))  # leftovers of a failed run of this very set
    units = plan_units(store, spec, dataset, set_id, previous, slots=worker_slots(compute))
    results = run_units(compute, units, store, _options(spec, compute, previous), progress, name=set_id)
    encoded = sum(r.encoded for r in results)
    reused = previous if previous is not None and encoded < dataset.rows else None
    return _new_set(spec, dataset, set_id, [r.key for r in results], sum(r.rows for r in results), encoded,
                    reused=reused)


def _embed_append(store: ObjectStore, spec: DatasetSpec, dataset: DatasetVersion, compute: DaskCompute,
                  previous: EmbeddingSet, added: list[str], set_id: str,
                  progress: Progress | None) -> EmbeddingSet | None:
    """Only the files added since `previous`; None when the rows do not add up (then everything is embedded)."""
    store.delete(set_prefix(spec.name, set_id))
    units = plan_units(store, spec, dataset, set_id, parts=added, slots=worker_slots(compute),
                       rows=dataset.rows - previous.rows)
    if previous.rows + sum(u.rows for u in units) != dataset.rows:
        return None
    results = run_units(compute, units, store, _options(spec, compute, None), progress, name=set_id)
    return _new_set(spec, dataset, set_id, [*previous.parts, *(r.key for r in results)], dataset.rows,
                    sum(r.encoded for r in results), extends=previous, reused=previous)


def read_embeddings(store: ObjectStore, embeddings: EmbeddingSet, columns: list[str] | None = None) -> pa.Table:
    """A whole embedding set as one Arrow table (`id`, `vector`, `text_hash`), in dataset row order."""
    pafs = store.pyarrow_filesystem()
    return pa.concat_tables(pq.read_table(store.path(k), filesystem=pafs, columns=columns) for k in embeddings.parts)


def progress_logger(name: str, every: float = 0.1) -> Progress:
    """A progress callback that logs done/total rows to the Prefect run log about every 10 %."""
    logger = get_run_logger()
    state = {"next": 0.0}

    def log(done: int, total: int) -> None:
        stage_progress("embed", done, total)
        share = done / total if total else 1.0
        if share >= state["next"] or done == total:
            logger.info("embed %s: %d/%d rows (%.0f%%)", name, done, total, 100 * share)
            state["next"] = share + every

    return log


@task(name="embed-texts", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error,
      tags=["lifecycle", "embed"])
def embed_task(store: ObjectStore, spec: DatasetSpec, dataset: DatasetVersion, compute: DaskCompute,
               previous: EmbeddingSet | None = None, inputs: dict[str, str] | None = None) -> EmbeddingSet:
    """Prefect wrapper: logs progress and reuse; retries cover a lost worker, not bad input."""
    logger = get_run_logger()
    record = embed_dataset(store, spec, dataset, compute, previous, inputs, progress_logger(spec.name))
    logger.info("embed %s: %d rows, %d encoded, %d reused from %s in %.1f s", spec.name, record.rows,
                record.encoded_rows, record.rows - record.encoded_rows, previous.id if previous else "nothing",
                record.seconds)
    return record
