r"""Prepare a config's data ahead of training: sources, tokenizer and token stores.

    python -m cpt_jax.data.prepare --config configs/demo.py [--config.data.workers=16]

The main job prepares whatever is missing by itself; running this first (e.g. on a CPU node
before a GPU job) keeps accelerators from waiting. Interrupted, it resumes: finished parts of a
store are kept, and a store is only read once its manifest, written last, exists. Several of these
and of training jobs may start at once on one cache: each part is prepared by one of them, and the
others wait for it.
"""

from __future__ import annotations

import json
import sys

from absl import app

from cpt_jax.data import pipeline
from cpt_jax.main import _CONFIG, ConfigError, expand_runs, parse_flags
from cpt_jax.metrics import setup_logging


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    setup_logging()
    seen = set()
    for _, run, _ in expand_runs(_CONFIG.value, workdir=""):
        key = (run.data.to_json(), run.seq_len)
        if key in seen:  # runs of one config usually share their data
            continue
        seen.add(key)
        try:
            data = pipeline.build(run.data, run.seq_len)
        except (ConfigError, ValueError) as e:
            print(f"config error: {e}", file=sys.stderr)
            sys.exit(2)
        summary = {k: {f: m[f] for f in ("n_docs", "n_tokens", "n_rows") if f in m} for k, m in data.manifests.items()}
        print(json.dumps({"seq_len": run.seq_len, "tokenizer": data.tokenizer.fingerprint,
                          "vocab_size": data.tokenizer.vocab_size, "stores": summary}, indent=2))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
