"""Loglikelihood requests per second: cpt_jax's harness backend (cpt_jax/harness.py) against the
harness's HF backend (torch) on the same model, exported, in one run. One JSON object per backend,
one per line.

  python bench/harness.py                                          # the bundled SmolLM2, CPU
  python bench/harness.py --src /tmp/cpt_smollm2 --requests 512    # a run's latest checkpoint

The requests are the bible_next_verse task's (context, choice) pairs in English and Chinese,
the same for both backends, scored twice: the first pass includes compilation (cpt_jax compiles
once per length bucket), the second is the steady rate.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import jax
from absl import flags

from cpt_jax import cli, convert, harness, inference, tasks

CLI = cli.Command(__doc__, label="bench error")
_SRC = flags.DEFINE_string("src", "smollm2", "A run's workdir, a converted model, or a bundled name.",
                           flag_values=CLI.flags)
_REQUESTS = flags.DEFINE_integer("requests", 128, "Loglikelihood requests to score.", flag_values=CLI.flags)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Rows per scoring batch.", flag_values=CLI.flags)


def bench() -> None:
    # lm-eval and torch: optional heavy dependencies (the [eval] extra), needed by this benchmark only
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    src = convert.bundled_model(_SRC.value) if _SRC.value in convert.BUNDLED else _SRC.value
    pairs = [(d["context"], tasks.BIBLE_LANGUAGES[lang] + c) for lang in ("en", "zh")
             for d in tasks.bible_next_verse(lang) for c in d["choices"]]
    picked = pairs[::max(1, len(pairs) // _REQUESTS.value)][:_REQUESTS.value]  # spread over both languages
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(picked)]
    model, tokenizer = inference.load(src)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "hf")
        convert.export_model(src, hf_dir)
        backends = {"cpt_jax": harness.make_lm(model, tokenizer, _BATCH_SIZE.value),
                    "hf": HFLM(pretrained=hf_dir, batch_size=_BATCH_SIZE.value, device="cpu", dtype="float32")}
        tokens = sum(len(tokenizer.encode(c + x)) for c, x in (r.args for r in reqs))
        for name, lm in backends.items():
            rates = []
            for _ in range(2):
                t0 = time.perf_counter()
                lm.loglikelihood(reqs, disable_tqdm=True)
                rates.append(len(reqs) / (time.perf_counter() - t0))
            print(json.dumps({"backend": name, "model": _SRC.value, "platform": jax.default_backend(),
                              "devices": jax.device_count(), "requests": len(reqs), "tokens": tokens,
                              "batch_size": _BATCH_SIZE.value, "first_pass_requests_per_s": round(rates[0], 2),
                              "requests_per_s": round(rates[1], 2)}), flush=True)


def main(argv: list[str] | None = None) -> int:
    """`python bench/harness.py ARGS...` in this process: the exit code."""
    return CLI.run(bench, argv)


if __name__ == "__main__":
    sys.exit(main())
