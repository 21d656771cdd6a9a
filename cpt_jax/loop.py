"""The training loop: steps, evals, log records and checkpoints, from a step to the run's end.

The loop only dispatches: the host builds the next batch while the device computes (`HostBatches`,
the stream being a pure function of the step), what is logged is fetched one step late and timed
by `metrics.Progress`, checkpoints are saved asynchronously by Orbax, and SIGTERM ends the loop
after the step in flight is saved.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable

import ml_collections

from cpt_jax import checkpoint, distributed, sharding, update
from cpt_jax.data.mixture import Mixture
from cpt_jax.errors import Preempted
from cpt_jax.metrics import Progress

Evals = Callable[[dict], dict]  # params -> {"eval/<name>/<metric>": value}


def train_loop(config: ml_collections.ConfigDict, steps: update.Steps, state: update.TrainState, step: int,
               batches: HostBatches, ckpt: checkpoint.Checkpointer, meta: checkpoint.Meta, progress: Progress,
               heldout: Evals, tasks: Evals | None) -> None:
    """Trains from `step` to config.total_steps: held-out losses every eval_every steps, at
    eval_steps and at the end, the harness's `tasks` as eval_tasks_every says, a record every log_every steps, a
    checkpoint (with `meta`) every checkpoint_every steps, at keep_steps and at the end. Raises
    Preempted after saving on SIGTERM."""
    c = config
    with distributed.Preemption() as preemption:
        while step < c.total_steps:
            state, m = steps.train(state, batches.next())
            step += 1
            progress.dispatched(m)
            last = step == c.total_steps
            evals = {}
            if step % c.eval_every == 0 or step in c.eval_steps or last:
                evals = progress.timed(heldout, state.params)
            if tasks and (last or (c.eval_tasks_every and step % c.eval_tasks_every == 0)):
                evals |= progress.timed(tasks, state.params)
            if step % c.log_every == 0 or evals:
                progress.log(step, m, evals)
            stop = preemption.now(step) and not last
            if step % c.checkpoint_every == 0 or step in c.keep_steps or last or stop:
                progress.nonfinite_steps(step)  # never a checkpoint past a non-finite step in stop mode
                ckpt.save(step, state.params, state.opt_state, meta)
            if stop:
                progress.flush()
                ckpt.wait()
                raise Preempted(f"preempted (SIGTERM): saved {ckpt.directory}/{step}; the same command resumes")
    progress.flush()


class HostBatches:
    """The batches of this process's rows of the global batch, built on the host one step ahead of
    the device."""

    def __init__(self, mixture: Mixture, batch_size: int, total_steps: int, shardings: dict, step: int):
        self.mixture, self.b, self.total, self.shardings = mixture, batch_size, total_steps, shardings
        self.rows = sharding.process_rows(shardings["tokens"], batch_size)
        self.pool = concurrent.futures.ThreadPoolExecutor(1)
        self.step, self.ahead = step, self.pool.submit(self._host, step)

    def _host(self, step: int) -> dict:
        tokens, source = self.mixture.batch(step, self.b, self.rows)
        return {"tokens": tokens, "source": source}

    def next(self) -> dict:
        batch = sharding.to_device(self.ahead.result(), self.shardings, self.b)
        self.step += 1
        if self.step < self.total:
            self.ahead = self.pool.submit(self._host, self.step)
        return batch

    def __enter__(self) -> HostBatches:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown()
