"""What a run shows: JSONL metrics, TensorBoard events, the log line, and MFU.

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
import os

import jax
from etils import epath

from cpt_jax import storage

# bf16 dense peak FLOP/s per device, for MFU. Devices not listed (CPU) get no MFU.
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
}


def peak_flops(device: jax.Device) -> float | None:
    kind = device.device_kind
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


def read_jsonl(path: str) -> list[dict]:
    path = epath.Path(path)  # local or gs://
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricWriter:
    """Appends metrics to DIR/metrics.jsonl and TensorBoard; a no-op off process 0."""

    def __init__(self, workdir: str, resume_step: int | None, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        if not enabled:
            return
        # Resuming keeps the lines up to the restored step; a fresh start drops stale ones.
        self.lines = [json.dumps(r) + "\n" for r in read_jsonl(self.path)
                      if resume_step is not None and r["step"] <= resume_step]
        storage.write_atomic(self.path, "".join(self.lines))
        from tensorboardX import SummaryWriter  # imported here: only process 0 needs it
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

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
    parts += [f"{k.split('/')[1]} {v:.4f}" for k, v in scalars.items() if k.startswith("eval/")]
    if scalars.get("train/nonfinite_steps"):
        parts.append(f"{scalars['train/nonfinite_steps']:.0f} non-finite steps skipped")
    if eta_s is not None and math.isfinite(eta_s):
        parts.append(f"ETA {datetime.timedelta(seconds=int(eta_s))}")
    return " | ".join(parts)


def setup_logging() -> None:
    # Our own lines at INFO; libraries (jax's backend probing, orbax) only from WARNING up.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    logging.getLogger("cpt_jax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's absl chatter on every manager
