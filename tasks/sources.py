"""Reading raw sources: CSV / Parquet / JSONL files (one file, a folder or a glob; local, file:// or s3://;
optionally compressed) as normalised Arrow tables, in bounded batches.

Why this shape:
- The source is streamed in Arrow batches, so memory stays bounded whatever the file size: Arrow's
  streaming CSV/JSON readers read up to 32 blocks ahead (their background queue), so the block size is
  what bounds their memory (32 × 2 MB). Small batches are then joined into groups of rows for hashing
  and for Parquet row groups of a useful size.
- Columns are cast to the types the spec implies (numeric → float64, categorical/text → string,
  label → string or float64), so two files with the same values give the same rows.
- Errors name the file and column: an Arrow message about `column #3` becomes the column's name; an
  unreachable endpoint is a transient `StoreUnavailableError`, bad bytes a plain `LifecycleError`.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from infra_blocks import ObjectStore
from infra_blocks.object_store import is_unreachable, unreachable_error
from lifecycle.errors import LifecycleError
from lifecycle.spec import DatasetSpec, Task

BLOCK_BYTES = 2 << 20
GROUP_ROWS = 131_072
HEADER_BYTES = 1 << 20
PARQUET_BATCH_ROWS = 250_000


def target_schema(spec: DatasetSpec, id_type: pa.DataType) -> pa.Schema:
    """The normalised Arrow schema of a dataset: spec column order, types implied by roles."""
    label_type = pa.float64() if spec.task is Task.regression else pa.string()
    fields = [pa.field(spec.id_column, id_type), pa.field(spec.label_column, label_type)]
    fields += [pa.field(c, pa.float64()) for c in spec.numeric_features]
    fields += [pa.field(c, pa.string()) for c in spec.categorical_features]
    if spec.text_column:
        fields.append(pa.field(spec.text_column, pa.string()))
    return pa.schema(fields)


def detect_format(source: str, declared: str) -> str:
    if declared != "auto":
        return declared
    name = source.lower().removesuffix(".gz").removesuffix(".bz2").removesuffix(".zst")
    for suffix, fmt in ((".csv", "csv"), (".parquet", "parquet"), (".pq", "parquet"), (".jsonl", "jsonl"),
                        (".ndjson", "jsonl"), (".json", "jsonl")):
        if name.endswith(suffix):
            return fmt
    raise LifecycleError(f"{source}: cannot tell the format from the name; set `format` in the spec")


def _column_error(message: str, names: list[str]) -> str:
    """Turn Arrow's 'In CSV column #3: …' into the column's name."""
    match = re.search(r"column #(\d+)", message)
    if match and int(match.group(1)) < len(names):
        message = message.replace(match.group(0), f"column {names[int(match.group(1))]!r}")
    return message.replace("In CSV ", "").strip()


def _csv_batches(f, spec: DatasetSpec, source: str) -> Iterator[pa.RecordBatch]:
    import pyarrow.csv as pacsv

    names = _csv_names(f)
    _require_columns(spec, names, source)
    wanted = target_schema(spec, pa.string())
    types = {c.name: c.type for c in wanted if c.name != spec.id_column}
    try:
        reader = pacsv.open_csv(
            f,
            read_options=pacsv.ReadOptions(block_size=BLOCK_BYTES),
            convert_options=pacsv.ConvertOptions(column_types=types, include_columns=spec.required_columns,
                                                 strings_can_be_null=True),
        )
        yield from reader
    except pa.ArrowInvalid as exc:
        raise LifecycleError(f"{source}: {_column_error(str(exc), names)}") from exc


def _csv_names(f) -> list[str]:
    """The CSV's column names, parsed from its first line only; leaves `f` at the start.

    Parsing a copy of the first line (not the file itself) keeps the header parse from racing a
    reader's read-ahead on the shared file, and costs nothing like a whole block.
    """
    import io

    import pyarrow.csv as pacsv

    size = HEADER_BYTES
    while True:
        head = f.read(size)
        f.seek(0)
        newline = head.find(b"\n")
        if newline >= 0 or len(head) < size:
            break
        size *= 4  # no newline yet: a very long header
    if newline >= 0:
        head = head[:newline + 1]
    reader = pacsv.open_csv(io.BytesIO(head), read_options=pacsv.ReadOptions(block_size=max(len(head), 1)))
    return reader.schema.names


def _parquet_batches(f, spec: DatasetSpec, source: str) -> Iterator[pa.RecordBatch]:
    try:
        pfile = pq.ParquetFile(f)
    except pa.ArrowInvalid as exc:
        raise LifecycleError(f"{source}: not a readable Parquet file ({exc})") from exc
    _require_columns(spec, pfile.schema_arrow.names, source)
    yield from pfile.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=spec.required_columns)


def _jsonl_batches(f, spec: DatasetSpec, source: str) -> Iterator[pa.RecordBatch]:
    import pyarrow.json as pajson

    wanted = target_schema(spec, pa.string())
    explicit = pa.schema([c for c in wanted if c.name != spec.id_column])
    reader = pajson.open_json(
        f,
        read_options=pajson.ReadOptions(block_size=BLOCK_BYTES),
        parse_options=pajson.ParseOptions(explicit_schema=explicit, unexpected_field_behavior="infer"),
    )
    _require_columns(spec, reader.schema.names, source)
    yield from reader


def _require_columns(spec: DatasetSpec, names: list[str], source: str) -> None:
    missing = [c for c in spec.required_columns if c not in names]
    if missing:
        raise LifecycleError(f"{source}: missing column(s) {', '.join(missing)} named in the spec")


READERS = {"csv": _csv_batches, "parquet": _parquet_batches, "jsonl": _jsonl_batches}


def expand_source(source: str, store: ObjectStore) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The files a source names: one file, every file of a folder, or a glob; sorted."""
    if ".." in source.replace("\\", "/").split("/"):
        raise LifecycleError(f"{source}: source paths may not contain '..'")
    protocol = source.split("://", 1)[0] if "://" in source else "file"
    options = store.storage_options() if protocol == store.protocol else {}
    fs = fsspec.filesystem(protocol, **options)
    path = source.split("://", 1)[1] if "://" in source else source
    if any(ch in path for ch in "*?["):
        files = sorted(fs.glob(path))
    elif fs.isdir(path):
        files = sorted(p for p in fs.find(path) if not p.rsplit("/", 1)[-1].startswith((".", "_")))
    elif fs.exists(path):
        files = [path]
    else:
        raise LifecycleError(f"{source}: no such file")
    if not files:
        raise LifecycleError(f"{source}: no files found")
    return fs, files


def normalise(batch: pa.RecordBatch, schema: pa.Schema, source: str) -> pa.Table:
    """Reorder and cast a batch to the dataset schema, naming the column that will not cast."""
    columns = []
    for fld in schema:
        col = batch.column(batch.schema.get_field_index(fld.name))
        try:
            columns.append(col.cast(fld.type) if col.type != fld.type else col)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise LifecycleError(f"{source}: column {fld.name!r} cannot be read as {fld.type} ({exc})") from exc
    return pa.Table.from_arrays(columns, schema=schema)


def read_source(store: ObjectStore, spec: DatasetSpec) -> Iterator[tuple[str, pa.Table]]:
    """Yield (file, normalised table) batches of every file the spec's source names."""
    fs, files = expand_source(spec.source, store)
    schema: pa.Schema | None = None
    for path in files:
        fmt = detect_format(path, spec.format)
        shown = path if "://" in spec.source or path.startswith("/") else spec.source
        try:
            with fs.open(path, "rb", compression="infer") as f:
                group: list[pa.Table] = []
                for batch in READERS[fmt](f, spec, shown):
                    if batch.num_rows == 0:
                        continue
                    if schema is None:
                        schema = target_schema(spec, _id_type(batch, spec))
                    group.append(normalise(batch, schema, shown))
                    if sum(t.num_rows for t in group) >= GROUP_ROWS:
                        yield shown, pa.concat_tables(group)
                        group = []
                if group:
                    yield shown, pa.concat_tables(group)
        except LifecycleError:
            raise
        except Exception as exc:
            if is_unreachable(exc):  # the source's endpoint, not its bytes: transient
                raise unreachable_error(shown, getattr(store, "endpoint_url", None), exc) from exc
            if isinstance(exc, FileNotFoundError):
                raise LifecycleError(f"{shown}: no such file") from exc
            if isinstance(exc, (EOFError, zlib.error, OSError)):
                raise LifecycleError(f"{shown}: unreadable or truncated ({exc})") from exc
            if isinstance(exc, pa.ArrowInvalid):
                raise LifecycleError(f"{shown}: {str(exc).splitlines()[0]}") from exc
            raise


def _id_type(batch: pa.RecordBatch, spec: DatasetSpec) -> pa.DataType:
    t = batch.schema.field(spec.id_column).type
    return pa.int64() if pa.types.is_integer(t) else pa.string()
