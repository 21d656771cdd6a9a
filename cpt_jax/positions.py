"""The held-out loss by position in the context: how much a model gains from the tokens before.

With `eval_position_bucket = W`, every held-out eval also logs the mean token loss over positions
[0, W), [W, 2W), ... of the rows (positions counted from each document's start where rows are
packed as `documents`), as `eval/<source>/loss_pos<start>`. A model that uses its context has a
curve that falls with position; one extended past its trained length (a RoPE it never saw there)
rises past it. `summary.positions` tabulates and plots a multi-run config's curves.
"""

from __future__ import annotations

import re

import numpy as np


_KEY = re.compile(r"^eval/(?P<source>.+)/loss_pos(?P<start>\d+)$")


def key(source: str, start: int) -> str:
    """The metric of `source`'s loss over the bucket that starts at position `start`."""
    return f"eval/{source}/loss_pos{start}"


def is_key(name: str) -> bool:
    return _KEY.match(name) is not None


def buckets(source: str, sums: np.ndarray, counts: np.ndarray, width: int) -> dict[str, float]:
    """Per-position loss sums and counted tokens [seq] as the mean loss of each `width` positions
    (the last bucket may be shorter; a bucket with no counted token is left out)."""
    out = {}
    for start in range(0, len(sums), width):
        n = counts[start:start + width].sum()
        if n:
            out[key(source, start)] = float(sums[start:start + width].sum() / n)
    return out


def curve(record: dict, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(bucket starts, losses) of `source` in one metrics record, by position."""
    pts = sorted((int(m["start"]), v) for k, v in record.items()
                 if (m := _KEY.match(k)) and m["source"] == source)
    return np.array([p[0] for p in pts], int), np.array([p[1] for p in pts])


def sources(records: list[dict]) -> list[str]:
    """The sources with losses by position in these records."""
    return sorted({m["source"] for r in records for k in r if (m := _KEY.match(k))})
