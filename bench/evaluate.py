"""Loglikelihood requests per second: cpt_jax's harness backend against the harness's HF backend
(torch) on the same model, exported, in one run. One JSON object per backend, one per line.

  python bench/evaluate.py                                          # the bundled SmolLM2, CPU
  python bench/evaluate.py --src /tmp/cpt_smollm2 --requests 512    # a run's latest checkpoint

The requests are the bible_next_verse task's (context, choice) pairs in English and Chinese,
the same for both backends, scored twice: the first pass includes compilation (cpt_jax compiles
once per length bucket), the second is the steady rate.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default="smollm2", help="a run's workdir, a converted model, or a bundled name")
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=8)
    a = p.parse_args()
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from cpt_jax import convert, inference, tasks
    from cpt_jax.evaluate import make_lm

    src = convert.bundled_model(a.src) if a.src in convert.BUNDLED else a.src
    pairs = [(d["context"], tasks.BIBLE_LANGUAGES[lang] + c) for lang in ("en", "zh")
             for d in tasks.bible_next_verse(lang) for c in d["choices"]]
    picked = pairs[::max(1, len(pairs) // a.requests)][:a.requests]  # spread over both languages
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(picked)]
    model, tokenizer = inference.load(src)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "hf")
        convert.export_model(src, hf_dir)
        backends = {"cpt_jax": make_lm(model, tokenizer, a.batch_size),
                    "hf": HFLM(pretrained=hf_dir, batch_size=a.batch_size, device="cpu", dtype="float32")}
        tokens = sum(len(tokenizer.encode(c + x)) for c, x in (r.args for r in reqs))
        for name, lm in backends.items():
            rates = []
            for _ in range(2):
                t0 = time.perf_counter()
                lm.loglikelihood(reqs, disable_tqdm=True)
                rates.append(len(reqs) / (time.perf_counter() - t0))
            print(json.dumps({"backend": name, "model": a.src, "platform": jax.default_backend(),
                              "devices": jax.device_count(), "requests": len(reqs), "tokens": tokens,
                              "batch_size": a.batch_size, "first_pass_requests_per_s": round(rates[0], 2),
                              "requests_per_s": round(rates[1], 2)}), flush=True)


if __name__ == "__main__":
    main()
