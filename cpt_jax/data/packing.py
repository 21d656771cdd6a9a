"""Pack variable-length documents into fixed rows for next-token training."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pack(token_lists: Sequence[Sequence[int] | np.ndarray], seq_len: int, eos_id: int) -> np.ndarray:
    """Concatenate documents, each followed by ``eos_id``, and cut the stream into
    non-overlapping rows of ``seq_len + 1`` tokens (inputs = row[:-1],
    targets = row[1:]). The final partial row is dropped.

    Returns int32 [n_rows, seq_len + 1] (n_rows may be 0).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    eos = np.array([eos_id], dtype=np.int32)
    parts: list[np.ndarray] = []
    for toks in token_lists:  # loop over documents only; tokens are copied by numpy
        parts.append(np.asarray(toks, dtype=np.int32).reshape(-1))
        parts.append(eos)
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    width = seq_len + 1
    n_rows = flat.size // width
    return np.ascontiguousarray(flat[: n_rows * width].reshape(n_rows, width))
