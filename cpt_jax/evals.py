"""What a run measures on its params besides the training loss: the held-out loss of each source,
and the harness's downstream tasks (`eval_tasks`)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from cpt_jax import harness, positions, sharding, update


def heldout_losses(steps: update.Steps, params: dict, eval_sets: dict[str, np.ndarray], batch_size: int,
                   max_batches: int = 0, position_bucket: int = 0) -> dict[str, float]:
    """Mean token loss over every held-out row of each source (rows [n, seq+1]; up to `max_batches`
    batches, 0: all), as eval/<source>/loss, and with `position_bucket` > 0 over each bucket of
    that many positions (`positions.key`); the last batch is padded with masked rows so nothing
    is dropped."""
    b, rows = batch_size, sharding.process_rows(steps.batch_sharding["tokens"], batch_size)
    out = {}
    for name, eval_rows in eval_sets.items():
        n = -(-len(eval_rows) // b)
        if max_batches:
            n = min(n, max_batches)
        sums = []
        for i in range(n):
            chunk = eval_rows[i * b:(i + 1) * b]
            valid = np.zeros(b, np.float32)
            valid[:len(chunk)] = 1.0
            chunk = np.concatenate([chunk, np.zeros((b - len(chunk), eval_rows.shape[1]), np.int32)])
            batch = sharding.to_device({"tokens": chunk[rows], "valid": valid[rows]}, steps.batch_sharding, b)
            sums.append(steps.eval(params, batch["tokens"], batch["valid"]))
        total, count = np.sum(jax.device_get(sums), axis=0, dtype=np.float64)  # [2, seq]
        out[f"eval/{name}/loss"] = total.sum() / count.sum()
        if position_bucket:
            out |= positions.buckets(name, total, count, position_bucket)
    return out


def task_metrics(scorer: harness.Scorer, params: dict, tasks: Sequence[str], limit: int) -> dict[str, float]:
    """The harness's metrics of `tasks` (at most `limit` documents each; 0: all) on these (sharded)
    params, as eval/<task>/<metric>. The run's one `scorer` compiles its length buckets once; every
    process scores every request (the model is one SPMD program)."""
    results = scorer.evaluate(params, tasks, limit or None)
    return {f"eval/{task}/{name}": value for task, metrics in results["results"].items()
            for name, value in harness.metric_values(metrics).items()}
