"""A run directory's layout, in one place. A training run's workdir and a converted pretrained
model share it, so `init_from`, `cpt_jax.load`, export, the sweep and its report read either:

    DIR/checkpoints/N/   Orbax: params, opt_state (runs only), meta (cpt_jax.checkpoint)
    DIR/tokenizer/       the tokenizer the checkpoints speak
    DIR/config.json      the config that made the run (its resume guard compares against it)
    DIR/metrics.jsonl    one JSON object per logged step (cpt_jax.metrics)
    DIR/tensorboard/     the same scalars as TensorBoard events

Paths may be local or `gs://` URLs.
"""

from __future__ import annotations

import dataclasses
import json
import os

from etils import epath

from cpt_jax import checkpoint, storage

# The entries of a run dir: attribute name -> name on disk.
ENTRIES = {"checkpoints": "checkpoints", "tokenizer": "tokenizer", "config": "config.json",
          "metrics": "metrics.jsonl", "tensorboard": "tensorboard"}


@dataclasses.dataclass(frozen=True)
class RunDir:
    path: str  # absolute, or a URL
    checkpoints: str = dataclasses.field(init=False)
    tokenizer: str = dataclasses.field(init=False)
    config: str = dataclasses.field(init=False)
    metrics: str = dataclasses.field(init=False)
    tensorboard: str = dataclasses.field(init=False)

    def __post_init__(self):
        for attr, name in ENTRIES.items():
            object.__setattr__(self, attr, os.path.join(self.path, name))

    @classmethod
    def of(cls, path: str) -> RunDir:
        """A run's dir from itself or from its checkpoints dir (users pass either)."""
        path = storage.absolute(str(path)).rstrip("/")
        leaf = ENTRIES["checkpoints"]
        if os.path.basename(path) == leaf and not epath.Path(path, leaf).is_dir():
            path = os.path.dirname(path)
        return cls(path)

    def latest_step(self) -> int | None:
        """The latest complete checkpoint step; None where there is none."""
        return checkpoint.latest_step(self.checkpoints)

    def read_config(self) -> dict | None:
        """The config.json of the run as a dict; None where the run has not written one."""
        path = epath.Path(self.config)
        return json.loads(path.read_text()) if path.exists() else None

    def read_metrics(self) -> list[dict]:
        return storage.read_jsonl(self.metrics)

    def meta(self, step: int | None = None) -> checkpoint.Meta:
        """The metadata of a checkpoint (the latest by default): config, model, tokenizer."""
        return checkpoint.Checkpointer(self.checkpoints, read_only=True).meta(step)
