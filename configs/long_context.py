r"""A longer context, on a laptop CPU: a small English model trained at 128 tokens, continued at
4x that (512) with YaRN RoPE, and beside it with its RoPE unchanged; the held-out loss by position
(chapters of the English Bible, positions from each chapter's start) logged at every eval.

  short      the `tiny` model on English at seq_len 128 (the source model);
  yarn_512   continues `short` at seq_len 512, RoPE rescaled by YaRN (factor 4), the same 2,048
             tokens per step;
  base_512   the same continuation with `short`'s RoPE as it was (positions past 128 it never saw).

Prints each run's loss by position at its first eval and its last, and draws both to
DIR/positions.png.

  python -m cpt_jax.main --config configs/long_context.py --workdir /tmp/long_context

Expected (measured; the whole table in docs/running.md, "Long-context evals"): at the first eval
at 512, YaRN 0.03 nats worse than the unchanged RoPE within the trained 128 positions and 0.07-0.09
better past 320; after 200 steps both at the same loss at every position (within 0.005).
Time: 4m34s on 2 CPU cores with the corpus cached.
Re-running resumes or skips finished runs.
"""

import ml_collections

from cpt_jax.config import base


def get_config() -> ml_collections.ConfigDict:
    c = base()
    c.model.size = "tiny"
    c.optimizer.peak_lr = 3e-3  # tiny models on few tokens want a far higher LR than the paper's 2e-4
    c.optimizer.weight_decay = 0.0
    c.data.sources = ml_collections.ConfigDict({"en": {"kind": "bible", "lang": "en"}})  # the KJV alone
    c.data.tokenizer.vocab_size = 4000
    c.data.target, c.data.replay, c.data.replay_ratio = "en", "en", 0.0  # no replay: one source
    # Positions count from each chapter's start, and attention stays within it: the loss at position
    # p is the loss with p tokens of the chapter before it.
    c.data.packing = "documents"
    c.data.eval_batches = 0  # every held-out chapter: the far positions have only the long ones
    c.eval_position_bucket = 64
    c.log_every = 20
    c.eval_every = 100
    c.checkpoint_every = 100
    c.seq_len, c.batch_size, c.total_steps = 128, 16, 300
    long = {"init_from": "run:short", "seq_len": 512, "batch_size": 4, "total_steps": 200,
            "eval_every": 50, "optimizer": {"peak_lr": 1e-3}}
    c.runs = ml_collections.ConfigDict({
        "short": {},
        "yarn_512": {**long, "model": {"size": "init_from", "rope_parameters": {
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}}},
        "base_512": {**long, "model": {"size": "init_from"}},
    })
    return c
