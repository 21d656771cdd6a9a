"""What a run shows: JSONL metrics, TensorBoard events, the log line, MFU, and the loop's
bookkeeping behind them (`Progress`).

`DIR/metrics.jsonl` holds one JSON object per logged step (keys like `step`, `train/loss`,
`eval/zh/loss`, `data/en_fraction`); it is the record the summary table and the scaling-law
fits read. On resume, lines past the restored step are dropped so the file reads as if the run
had never stopped.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from cpt_jax import positions, storage
from cpt_jax.tensorboard import EventWriter

log = logging.getLogger("cpt_jax")

# bf16 dense peak FLOP/s per device, for MFU. Devices not listed (CPU) get no MFU.
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
}


def peak_flops(device: jax.Device) -> float | None:
    kind = device.device_kind
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


def mfu(tokens_per_sec: float, flops_per_token: float, peak_per_device: float | None, devices: int) -> float | None:
    """Model FLOPs utilisation: tokens/s x training FLOPs per token / the devices' peak FLOP/s."""
    return tokens_per_sec * flops_per_token / (peak_per_device * devices) if peak_per_device else None


class MetricWriter:
    """Appends metrics to DIR/metrics.jsonl and TensorBoard; a no-op off process 0."""

    def __init__(self, path: str, tensorboard_dir: str, resume_step: int | None, enabled: bool = True):
        self.enabled, self.path = enabled, path
        if not enabled:
            return
        # Resuming keeps the lines up to the restored step; a fresh start drops stale ones.
        self.lines = [json.dumps(r) + "\n" for r in storage.read_jsonl(self.path)
                      if resume_step is not None and r["step"] <= resume_step]
        storage.write_atomic(self.path, "".join(self.lines))
        self.tb = EventWriter(tensorboard_dir)

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self.lines.append(json.dumps(record) + "\n")
        if storage.is_remote(self.path):  # objects cannot be appended to: the file is rewritten
            storage.write_atomic(self.path, "".join(self.lines))
        else:
            with open(self.path, "a") as f:
                f.write(self.lines[-1])
        for k, v in scalars.items():
            self.tb.add_scalar(k, float(v), int(step))
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()


def log_line(step: int, total: int, scalars: dict, eta_s: float | None) -> str:
    parts = [f"step {step}/{total}"]
    for k, fmt in (("train/loss", "loss {:.4f}"), ("train/grad_norm", "gnorm {:.3f}"), ("train/lr", "lr {:.2e}"),
                   ("perf/tokens_per_sec", "{:,.0f} tok/s"), ("perf/mfu", "MFU {:.1%}")):
        if k in scalars:
            parts.append(fmt.format(scalars[k]))
    # eval/en/loss as "en", eval/bible_next_verse_zh/acc as "bible_next_verse_zh/acc"; losses by
    # position only in the records
    parts += [f"{k.removeprefix('eval/').removesuffix('/loss')} {v:.4f}" for k, v in scalars.items()
              if k.startswith("eval/") and not positions.is_key(k)]
    if scalars.get("train/nonfinite_steps"):
        parts.append(f"{scalars['train/nonfinite_steps']:.0f} non-finite steps skipped")
    if eta_s is not None and math.isfinite(eta_s):
        parts.append(f"ETA {datetime.timedelta(seconds=int(eta_s))}")
    return " | ".join(parts)


class Progress:
    """The loop's bookkeeping, kept out of its way:
    - a logged step's metrics are fetched only after the next step is dispatched, so the host
      never stalls the device;
    - speed is measured between the moments two logged steps finish, less the time in evals;
    - non-finite steps are counted on the device and fetched only when a record is written
      (`check_nonfinite(step, count)` decides what a count means: stop, or go on);
    - a source that runs past its end is logged once per epoch."""

    def __init__(self, writer: MetricWriter, mixture, *, start_step: int, total_steps: int, batch_size: int,
                 seq_len: int, flops_per_token: float, check_nonfinite: Callable[[int, int], None]):
        self.writer, self.mixture, self.total = writer, mixture, total_steps
        self.b, self.t, self.flops_per_token = batch_size, seq_len, flops_per_token
        self.check_nonfinite = check_nonfinite
        self.nonfinite = jnp.zeros((), jnp.int32)  # summed on the device, step by step, without a sync
        self._pending: tuple | None = None  # (step, device metrics, evals)
        self._since = (time.perf_counter(), start_step)  # the last record: when, and at which step
        self._eval_s = 0.0
        self._epochs: dict[str, float] = {}

    def start(self, evals: dict) -> None:
        """The evals before the first step; the speed clock starts after them."""
        self.writer.write(0, evals)
        log.info(log_line(0, self.total, evals, None))
        self._since = (time.perf_counter(), self._since[1])

    def dispatched(self, metrics: dict) -> None:
        """After a step went to the device: the previous logged step written (fetching it waits for
        that step only: this one is queued behind it), with the non-finite steps up to it; then this
        step's non-finite flag counted. A good step's record is written before a later bad step
        can stop the run."""
        self.flush()
        self.nonfinite = self.nonfinite + metrics["nonfinite"]

    def log(self, step: int, metrics: dict, evals: dict) -> None:
        """Record `step` once the next step has been dispatched (or at `flush`)."""
        self._pending = (step, metrics, evals)

    def timed(self, evals: Callable[[dict], dict], params: dict) -> dict:
        """`evals(params)`, its time kept out of the speed; the wait for training still counts as training."""
        jax.block_until_ready(params)
        t0 = time.perf_counter()
        out = evals(params)
        self._eval_s += time.perf_counter() - t0
        return out

    def nonfinite_steps(self, step: int) -> int:
        """Non-finite steps so far (fetched from the device now), through `check_nonfinite`."""
        n = int(jax.device_get(self.nonfinite))
        self.check_nonfinite(step, n)
        return n

    def flush(self) -> None:
        if self._pending:
            step, m, evals = self._pending
            self._pending = None
            self._write(step, jax.device_get(m), evals)  # waits for that step only

    def _write(self, step: int, m: dict, evals: dict) -> None:
        now = time.perf_counter()
        train_s, n = now - self._since[0] - self._eval_s, step - self._since[1]
        tokens_per_sec = n * self.b * self.t / train_s
        r = {"train/loss": m["loss"], "train/grad_norm": m["grad_norm"], "train/lr": m["lr"],
             "train/tokens": step * self.b * self.t}
        counts, epochs = self.mixture.cumulative_counts(step, self.b), self.mixture.epochs(step, self.b)
        for i, name in enumerate(self.mixture.source_names):
            if m["source_count"][i] > 0:
                r[f"train/{name}/loss"] = m["source_loss_sum"][i] / m["source_count"][i]
            r[f"data/{name}_fraction"] = counts[name] / (step * self.b)
            r[f"data/{name}_epoch"] = epochs[name]
            if int(epochs[name]) > int(self._epochs.get(name, epochs[name])):
                log.info("source %s ran past its end: epoch %d began before step %d (reshuffled by seed)",
                         name, int(epochs[name]), step)
            self._epochs[name] = epochs[name]
        r["perf/tokens_per_sec"], r["perf/step_time_s"] = tokens_per_sec, train_s / n
        utilisation = mfu(tokens_per_sec, self.flops_per_token, peak_flops(jax.devices()[0]), jax.device_count())
        if utilisation is not None:
            r["perf/mfu"] = utilisation
        r.update(evals)
        r["train/nonfinite_steps"] = self.nonfinite_steps(step)
        self._since, self._eval_s = (now, step), 0.0
        self.writer.write(step, r)
        log.info(log_line(step, self.total, r, (self.total - step) * r["perf/step_time_s"]))


def setup_logging() -> None:
    # Our own lines at INFO; libraries (jax's backend probing, orbax) only from WARNING up.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    logging.getLogger("cpt_jax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's absl chatter on every manager
