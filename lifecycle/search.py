"""Semantic search over an index built by the index stage; used by the serving app and `lifecycle search`.

A `Searcher` pins one table version (by number or by its dataset tag), so what it answers from cannot
change under it while the index stage writes newer versions. It embeds queries with the same encoder
and text preparation as the embed stage, and applies the query settings (nprobes, refine_factor, ef)
the index stage measured to reach its recall target. It imports neither Prefect nor the stage code, so
the serving image stays small.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from lifecycle.encoder import encode as encode_texts
from lifecycle.encoder import load_encoder, prepare_texts
from lifecycle.errors import LifecycleError

if TYPE_CHECKING:
    from lifecycle.records import IndexVersion


class VectorLocation(Protocol):
    """Where this process reaches the LanceDB database (the `VectorStore` block is one); a protocol so
    that core does not import the blocks layer."""

    uri: str

    def lance_storage_options(self) -> dict[str, str]: ...

# Columns of an index table (written by tasks.lancedb_index); every other column is metadata.
ID = "id"
VECTOR = "vector"
TEXT = "text"
DISTANCE = "cosine"
MAX_K = 1000


class Searcher:
    """Answers text queries from one LanceDB table version.

    Args:
        uri: LanceDB database URI.
        table: Table name.
        version: Table version number or tag (e.g. `ds-<dataset version>`); None for the latest.
        storage_options: Lance object-store options (S3 endpoint, keys).
        device: Where the query encoder runs.
        distance_type: The metric the index was built with.
        query_params: ANN query settings chosen by the index stage (`nprobes`, `refine_factor`, `ef`).
        max_chars: Queries longer than this are cut, as the embed stage cut the indexed texts.
        precision: The query encoder's weights, "float32" or "bfloat16" (see
            `lifecycle.encoder.query_precision`); the indexed vectors are float32 either way.
    """

    def __init__(self, uri: str, table: str, version: int | str | None = None, *,
                 storage_options: dict[str, str] | None = None, device: str = "cpu",
                 distance_type: str = DISTANCE, query_params: dict[str, int] | None = None,
                 max_chars: int = 2000, precision: str = "float32") -> None:
        import lancedb

        try:
            db = lancedb.connect(uri, storage_options=storage_options or None)
            self._table = db.open_table(table)
        except (ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
            raise LifecycleError(f"{uri}: no index table {table!r} ({str(exc).splitlines()[0]})") from exc
        if version is not None:
            try:
                self._table.checkout(version)
            except (ValueError, OSError, RuntimeError) as exc:
                raise LifecycleError(f"{uri}/{table}: no version or tag {version!r}") from exc
        self.uri, self.table_name, self.requested = uri, table, version
        self.distance_type = distance_type
        self.query_params = dict(query_params or {})
        self.max_chars = max_chars
        self.device = device
        self.precision = precision
        self.metadata_types = {f.name: f.type for f in self._table.schema if f.name not in (ID, VECTOR, TEXT)}
        self.metadata_columns = list(self.metadata_types)
        self.encoder = load_encoder(device, precision=precision)

    @classmethod
    def from_record(cls, record: IndexVersion, vectors: VectorLocation, device: str = "cpu",
                    by_tag: bool = False, precision: str = "float32") -> Searcher:
        """The searcher for an IndexVersion: its exact table version (or its tag) and query settings.

        The database is reached through `vectors` (how this process sees the store; a container may
        mount it elsewhere than where it was built), not the URI recorded for lineage.
        """
        params = record.index_params
        return cls(vectors.uri, record.table, record.tag if by_tag else record.table_version,
                   storage_options=vectors.lance_storage_options() or None, device=device,
                   distance_type=params.get("distance_type", DISTANCE), query_params=params.get("query") or {},
                   max_chars=params.get("max_chars", 2000), precision=precision)

    @property
    def version(self) -> int:
        return self._table.version

    @property
    def rows(self) -> int:
        return self._table.count_rows()

    def embed(self, query: str) -> np.ndarray:
        """The query's vector, prepared exactly like an indexed text."""
        return self.embed_many([query])[0]

    def embed_many(self, queries: list[str]) -> np.ndarray:
        """Several queries' vectors in one encoder batch (the server batches concurrent queries: one text
        costs ~10 ms of mostly fixed overhead, 64 texts ~2 ms each)."""
        return encode_texts(prepare_texts(queries, self.max_chars), self.device, precision=self.precision)

    def search(self, query: str, k: int = 5, where: str | None = None) -> list[dict[str, Any]]:
        """The k rows nearest to a text query.

        Args:
            query: Free text.
            k: Number of results (1..1000).
            where: Optional SQL filter on metadata columns, e.g. "category = 'billing'" (applied before
                the vector search, so k results come back whenever k rows match).

        Returns:
            Dicts with `id`, `text`, `metadata` (column -> value) and `_distance` (cosine distance),
            nearest first.

        Raises:
            LifecycleError: k out of range or an invalid `where` filter.
        """
        if not isinstance(query, str):
            raise LifecycleError("search: query must be a string")
        return self.search_vector(self.embed(query), k, where)

    def search_vector(self, vector: np.ndarray, k: int = 5, where: str | None = None) -> list[dict[str, Any]]:
        """Like `search`, for a vector already embedded."""
        return self.search_vectors(np.asarray(vector, dtype=np.float32)[None, :], k, where)[0]

    def search_vectors(self, vectors: np.ndarray, k: int = 5, where: str | None = None) -> list[list[dict[str, Any]]]:
        """The k nearest rows of each vector (same k and filter), in one LanceDB query.

        Why one query: LanceDB runs several query vectors in one plan (its `query_index` column tells
        them apart); 9 vectors cost 3.4 ms together against 29 ms one by one (2,000 rows, filtered).
        """
        if not 1 <= k <= MAX_K:
            raise LifecycleError(f"search: k must be between 1 and {MAX_K}, got {k}")
        vectors = np.asarray(vectors, dtype=np.float32)
        many = len(vectors) > 1
        # A vector query builder (LanceDB types `search` as the base builder, without distance_type).
        builder: Any = self._table.search(list(vectors) if many else vectors[0], vector_column_name=VECTOR)
        query = (builder.distance_type(self.distance_type).limit(k)
                 .select([ID, TEXT, *self.metadata_columns, "_distance"]))
        if where:
            query = query.where(where, prefilter=True)
        for name, value in self.query_params.items():
            query = getattr(query, name)(value)
        try:
            rows = query.to_arrow().to_pylist()
        except (ValueError, RuntimeError, OSError) as exc:
            problem = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            what = "invalid filter" if where else f"query on {self.table_name} failed"  # never echo the filter
            raise LifecycleError(f"search: {what} ({problem})") from exc
        out: list[list[dict[str, Any]]] = [[] for _ in range(len(vectors))]
        for r in rows:
            out[r["query_index"] if many else 0].append(
                {ID: r[ID], TEXT: r[TEXT], "metadata": {c: r[c] for c in self.metadata_columns},
                 "_distance": float(r["_distance"])})
        for hits in out:
            hits.sort(key=lambda h: h["_distance"])
        return out
