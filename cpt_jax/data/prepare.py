r"""Prepare a config's data ahead of training: sources, tokenizer and token stores.

    python -m cpt_jax.data.prepare --config configs/demo.py [--config.data.workers=16]

The main job prepares whatever is missing by itself; running this first (e.g. on a CPU node
before a GPU job) keeps accelerators from waiting. Interrupted, it resumes: finished parts of a
store are kept, and a store is only read once its manifest, written last, exists. Several of these
and of training jobs may start at once on one cache: each part is prepared by one of them, and the
others wait for it. Exit codes are the main job's (cpt_jax.cli).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from cpt_jax import cli
from cpt_jax.config import expand_runs
from cpt_jax.errors import ConfigError
from cpt_jax.data import pipeline

CLI = cli.Command(__doc__, config=cli.CONFIG_HELP, required=("config",))


def prepare(config) -> list[dict]:
    """Prepares the data of every run of `config` (runs sharing their data, once); returns a
    summary per distinct data config."""
    out, seen = [], set()
    for _, run, _ in expand_runs(config, workdir=""):
        key = (run.data.to_json(), run.seq_len)
        if key in seen:  # runs of one config usually share their data
            continue
        seen.add(key)
        try:
            data = pipeline.build(run.data, run.seq_len)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        stores = {k: {f: m[f] for f in ("n_docs", "n_tokens", "n_rows") if f in m} for k, m in data.manifests.items()}
        for k, m in data.manifests.items():  # of the source (in neither split); there with bad_documents="skip"
            if "bad_documents" in m.get("meta", {}):
                stores[k]["bad_documents"] = m["meta"]["bad_documents"]["count"]
        out.append({"seq_len": run.seq_len, "tokenizer": data.tokenizer.fingerprint,
                    "vocab_size": data.tokenizer.vocab_size, "stores": stores})
    return out


def prepare_config() -> None:
    for summary in prepare(CLI.config.value):
        print(json.dumps(summary, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cpt_jax.data.prepare ARGS...` in this process (argv without the program name): the exit code."""
    return CLI.run(prepare_config, argv)


if __name__ == "__main__":
    sys.exit(main())
