"""Held-out documents chosen by content, for the sources without an eval split of their own (files,
and tfds without `eval_split`): a document is held out iff a 64-bit hash of its UTF-8 text is below
a cutoff, so the copies of one document, wherever they are, never straddle train and eval."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np


def content_hash(text: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


def eval_cutoff(hashes: Iterable[int], eval_fraction: float) -> int:
    """The hash cutoff that holds out about `eval_fraction` of the documents of `hashes` (their
    `content_hash`es), at least one and never all of them."""
    target = int(eval_fraction * 2**64)
    n = below = 0
    lowest, highest = 2**64, -1
    for h in hashes:
        n += 1
        below += h < target
        lowest, highest = min(lowest, h), max(highest, h)
    if n == 0:
        raise ValueError("no non-empty documents")
    if n == 1:
        raise ValueError("only 1 document; need at least 2, since one is held out for eval")
    if lowest == highest:
        raise ValueError(f"all {n} documents are identical; need 2 different ones to hold one out")
    if below == 0:
        return lowest + 1  # hold out the document(s) with the lowest hash
    if below == n:
        return highest  # keep the document(s) with the highest hash for training
    return target


class Positions:
    """The positions of one split among `n` records: the held-out ones (`held`, sorted) or the
    others, in order. O(log) per lookup, from the held-out positions alone."""

    def __init__(self, n: int, held: np.ndarray, held_out: bool):
        self.n, self.held, self.held_out = n, held, held_out
        self._kept_before = held - np.arange(len(held))  # of each held-out record: kept records before it

    def __len__(self) -> int:
        return len(self.held) if self.held_out else self.n - len(self.held)

    def __getitem__(self, k: int) -> int:
        if not 0 <= k < len(self):
            raise IndexError(k)
        if self.held_out:
            return int(self.held[k])
        # The k-th kept record comes after the held-out records with at most k kept records before them.
        return k + int(np.searchsorted(self._kept_before, k, side="right"))
