"""Weighted mixture of packed sources as a pure function of (seed, step, slot).

Nothing is iterated: batch(step) is computed from scratch, so resuming needs
only the step number, and each process can build just its own slice of the
global batch.

How a batch is made (B = batch_size, which must stay fixed for a run, since
the number of examples drawn before ``step`` is computed as step * B):

1. Per-step counts. Cumulative draws of each source after N = step * B
   examples come from a chain of floors: source 0 gets floor(N * w_0), source 1
   gets floor(rest * w_1 / (w_1 + ... + w_K-1)) of the rest, ..., the last
   source takes what is left. Each term is monotone in N, so per-step counts
   (cumulative at step+1 minus cumulative at step) are >= 0 and sum to B. With
   two sources this is exactly floor(N * w_0) for the first; with more, every
   source stays within K-1 examples of N * w_k. Integer/Fraction arithmetic
   only, so no float drift at large steps. With staged weights the chain
   runs per stage over the examples since the stage began, added to the
   exact totals of the stages before.
2. Slot placement. A permutation of the B slots seeded by (seed, step) decides
   which slots get which source.
3. Row choice. The j-th example ever drawn from source k is row
   perm_{seed,k,e}(j % n_k) with epoch e = j // n_k: each epoch is a fresh
   permutation, so every row is seen exactly once per epoch. The permutation
   is a keyed Feistel network with cycle-walking, evaluated only at the
   indices a batch needs: no O(n) table, so the first batch after a resume
   costs the same for a store of a thousand rows or of a billion.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction

import numpy as np

# Domain tags keep the slot and row RNG streams independent for the same seed.
_SLOT_TAG, _ROW_TAG = 0, 1


Weights = Mapping[str, float]


class Mixture:
    """``weights`` is one mapping {source: weight} for the whole run, or stages
    ``[(start_step, weights), ...]`` (the first at step 0, starts increasing): e.g. 30% replay for
    the first 10% of steps, then 5%. Counts stay exact across a switch: the draws before a stage
    are fixed, and the stage's chain of floors runs over the examples since its start."""

    def __init__(self, sources: Mapping[str, np.ndarray], weights: Weights | Sequence[tuple[int, Weights]],
                 seed: int = 0):
        if not sources:
            raise ValueError("need at least one source")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.seed = int(seed)
        self.source_names: tuple[str, ...] = tuple(sources)
        stages = [(0, weights)] if isinstance(weights, Mapping) else [(int(s), w) for s, w in weights]
        if not stages or stages[0][0] != 0 or any(a[0] >= b[0] for a, b in zip(stages, stages[1:])):
            raise ValueError(f"weight stages must start at step 0 and increase, got starts {[s for s, _ in stages]}")
        for start, w in stages:
            self._check_weights(w, f"weights from step {start}" if len(stages) > 1 else "weights")
        self.stages: list[tuple[int, dict[str, float]]] = [
            (start, {n: float(w[n]) for n in self.source_names}) for start, w in stages]

        self._data: list[np.ndarray] = []
        width = None
        for name in self.source_names:
            arr = np.asarray(sources[name])
            if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"source {name!r} must be a 2-D integer array, got {arr.dtype} {arr.shape}")
            if width is not None and arr.shape[1] != width:
                raise ValueError(f"source {name!r} has rows of {arr.shape[1]} tokens, others {width}")
            width = arr.shape[1]
            if arr.shape[0] == 0 and any(w[name] > 0 for _, w in self.stages):
                raise ValueError(f"source {name!r} has a positive weight but no rows")
            self._data.append(arr.astype(np.int32, copy=False))
        self.row_len: int = int(width)  # seq_len + 1
        self._ratios = [self._chain_ratios(w) for _, w in self.stages]

    def _check_weights(self, weights: Weights, what: str) -> None:
        if set(weights) != set(self.source_names):
            missing = sorted(set(self.source_names) - set(weights))
            extra = sorted(set(weights) - set(self.source_names))
            raise ValueError(f"{what}: names differ from the sources: no weight for {missing}, no source for {extra}")
        for name, w in weights.items():
            if not math.isfinite(float(w)) or float(w) < 0:
                raise ValueError(f"{what}: weight of source {name!r} must be finite and >= 0, got {w!r}")
        total = sum(float(w) for w in weights.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"{what} must sum to 1 (within 1e-6), got {total!r}: {dict(weights)}")

    def _chain_ratios(self, weights: dict[str, float]) -> list[tuple[int, int]]:
        """Share of source k among sources k..K-1 (the last takes the rest), as exact fractions
        (limit_denominator turns 0.7 into 7/10, not 0.69999...)."""
        fr = [Fraction(weights[n]).limit_denominator(10**9) for n in self.source_names]
        out = []
        for k in range(len(fr) - 1):
            tail = sum(fr[k:], Fraction(0))
            r = fr[k] / tail if tail > 0 else Fraction(0)
            out.append((r.numerator, r.denominator))
        return out

    def weights_at(self, step: int) -> dict[str, float]:
        """The configured weights in force at ``step``."""
        return next(w for start, w in reversed(self.stages) if start <= step)

    # ---- counts -------------------------------------------------------------

    def _cumulative(self, step: int, batch_size: int) -> list[int]:
        """Draws per source in steps 0..step-1: the whole of each earlier stage, then the chain
        of floors over this stage's examples so far. Python ints: exact at any step."""
        total = [0] * len(self.source_names)
        for i, (start, _) in enumerate(self.stages):
            if start >= step:
                break
            end = self.stages[i + 1][0] if i + 1 < len(self.stages) else step
            rest = (min(end, step) - start) * batch_size
            for k, (num, den) in enumerate(self._ratios[i]):
                c = rest * num // den
                total[k] += c
                rest -= c
            total[-1] += rest
        return total

    def cumulative_counts(self, step: int, batch_size: int) -> dict[str, int]:
        """Examples drawn from each source in steps 0..step-1."""
        return dict(zip(self.source_names, self._cumulative(step, batch_size)))

    def step_counts(self, step: int, batch_size: int) -> dict[str, int]:
        """Examples of each source in the batch of ``step``."""
        a, b = self._cumulative(step, batch_size), self._cumulative(step + 1, batch_size)
        return {n: y - x for n, x, y in zip(self.source_names, a, b)}

    def epoch(self, name: str, step: int, batch_size: int) -> int:
        """Epoch of ``name`` that the batch at ``step`` starts drawing from (for logging)."""
        k = self.source_names.index(name)
        n = self._data[k].shape[0]
        return self._cumulative(step, batch_size)[k] // n if n else 0

    def epochs(self, step: int, batch_size: int) -> dict[str, float]:
        """Fractional epochs completed per source before ``step``."""
        c = self._cumulative(step, batch_size)
        return {n: (c[k] / self._data[k].shape[0] if self._data[k].shape[0] else 0.0)
                for k, n in enumerate(self.source_names)}

    # ---- sampling -----------------------------------------------------------

    def batch(self, step: int, batch_size: int, slots: slice | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Tokens int32 [b, row_len] and source ids int32 [b] (index into
        source_names) for the given slots of the global batch at ``step``."""
        if step < 0 or batch_size < 1:
            raise ValueError(f"need step >= 0 and batch_size >= 1, got {step}, {batch_size}")
        before = self._cumulative(step, batch_size)
        after = self._cumulative(step + 1, batch_size)

        slot_perm = np.random.default_rng([self.seed, _SLOT_TAG, step]).permutation(batch_size)
        src = np.empty(batch_size, np.int32)
        draw = np.empty(batch_size, np.int64)  # j: index of the example within its source's stream
        pos = 0
        for k, (c0, c1) in enumerate(zip(before, after)):
            taken = slot_perm[pos:pos + c1 - c0]
            src[taken] = k
            draw[taken] = c0 + np.arange(c1 - c0)
            pos += c1 - c0

        sel = np.arange(batch_size)[slots] if slots is not None else np.arange(batch_size)
        src, draw = src[sel], draw[sel]
        tokens = np.empty((sel.size, self.row_len), np.int32)
        for k in np.unique(src):
            mask = src == k
            n = self._data[k].shape[0]
            j = draw[mask]
            ep, idx = j // n, j % n
            rows = np.empty_like(idx)
            for e in np.unique(ep):  # usually one epoch, two at an epoch boundary
                m = ep == e
                rows[m] = permute(idx[m], n, (self.seed, _ROW_TAG, int(k), int(e)))
            tokens[mask] = self._data[k][rows]
        return tokens, src


_ROUNDS = 4


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a strong 64-bit hash (uint64 arithmetic wraps, as intended)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def permute(idx: np.ndarray, n: int, key: tuple[int, ...]) -> np.ndarray:
    """The images of ``idx`` under a pseudo-random permutation of range(n) chosen by ``key``.

    A balanced Feistel network is a bijection on [0, 4^h) for any round function; values that
    land outside [0, n) are sent through it again (cycle-walking), which keeps it a bijection on
    [0, n). 4^h < 4n, so a few walks suffice."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    round_keys = np.random.default_rng(list(key)).integers(0, 2**63, _ROUNDS, dtype=np.uint64)
    out = np.asarray(idx, dtype=np.uint64).copy()
    todo = np.arange(out.size)
    with np.errstate(over="ignore"):
        while todo.size:
            left, right = out[todo] >> np.uint64(half), out[todo] & mask
            for rk in round_keys:
                left, right = right, left ^ (_mix(right ^ rk) & mask)
            out[todo] = (left << np.uint64(half)) | right
            todo = todo[out[todo] >= n]
    return out.astype(np.int64)
