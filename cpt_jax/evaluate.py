"""Downstream evaluation with EleutherAI's lm-evaluation-harness, on the JAX model itself.

  python -m cpt_jax.evaluate --workdir RUN [--step N] --tasks bible_next_verse,piqa [--limit K] [--batch_size B]

`JaxLM` is a harness LM backed by a checkpoint as `cpt_jax.models.load` reads it (a run's workdir
or a converted model; no HF export): `loglikelihood` and `loglikelihood_rolling` score rows of
tokens batched by length (rows sorted longest first, padded to a bucket of BUCKET tokens and a
fixed batch, so a task compiles once per bucket), sharded over the devices' batch axis as
training is; `generate_until` decodes with the KV-cache generator. Requests are tokenized as the
harness's HF backend tokenizes them (BOS where the tokenizer's convention adds it; a context's
trailing spaces moved to the continuation; contexts truncated on the left to `max_length`), so
an exported model scored by that backend gets the same loglikelihoods.

Task names are checked (`tasks.resolve`) before any model is loaded. Results are written as the
harness returns them (results.json under --output, default WORKDIR/eval/step_N), and one line
per task and metric is printed.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpt_jax import sharding
from cpt_jax.generation import generate_ids

log = logging.getLogger(__name__)

BUCKET = 64  # rows are padded to a multiple of this many tokens: one compile per bucket


def _harness():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ImportError("downstream evaluation needs lm-evaluation-harness: pip install -e '.[eval]'") from None
    from lm_eval.api.model import TemplateLM

    return TemplateLM


def make_lm(model, tokenizer, batch_size: int = 16, max_length: int = 2048, mesh=None):
    """A harness LM (`lm_eval.api.model.TemplateLM`) over `model` (cpt_jax.models.Llama) and its
    tokenizer; `mesh`: where its params and batches live (default: every device, data-parallel)."""
    return _jax_lm_class()(model, tokenizer, batch_size, max_length, mesh)


@functools.cache  # one class, defined once the harness is importable
def _jax_lm_class():
    TemplateLM = _harness()

    class JaxLM(TemplateLM):
        backend = "causal"

        def __init__(self, model, tokenizer, batch_size: int, max_length: int, mesh):
            super().__init__()
            if tokenizer is None:
                raise ValueError("the checkpoint has no tokenizer dir: the harness scores text")
            self.tok, self.batch_size, self._max_length = tokenizer, int(batch_size), int(max_length)
            self.mesh = mesh if mesh is not None else sharding.make_mesh((-1, 1, 1))
            if self.batch_size % sharding.data_parallel_size(self.mesh):
                raise ValueError(f"--batch_size {batch_size} must be a multiple of the "
                                 f"{sharding.data_parallel_size(self.mesh)} data-parallel devices")
            self.model = model
            self._score = _scorer(model, self.mesh)

        # -- tokenization, as the HF backend does it
        @property
        def eot_token_id(self) -> int:
            return self.tok.eos_id

        @property
        def prefix_token_id(self) -> int:
            return self.tok.eos_id if self.tok.bos_id is None else self.tok.bos_id

        @property
        def max_length(self) -> int:
            return self._max_length

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None,
                       **kwargs) -> list[int]:
            add = self.tok.add_bos if add_special_tokens is None else add_special_tokens
            if add_special_tokens is None and self.tok.bos_id is not None and string.startswith(
                    self.tok.decode([self.tok.bos_id]) or "\0"):
                add = False  # the text carries its BOS already
            ids = ([self.tok.bos_id] if add and self.tok.bos_id is not None else []) + self.tok.encode(string)
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def tok_decode(self, ids) -> str:
            return self.tok.decode(list(ids))

        # -- scoring
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            rows = []
            for _, context, continuation in requests:
                whole = (list(context) + list(continuation))[-(self.max_length + 1):]
                rows.append((whole, len(continuation)))
            return score_rows(self._score, rows, self.batch_size)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            from lm_eval import utils

            windows, owner = [], []
            for i, (text,) in enumerate(req.args for req in requests):
                for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                        self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1)):
                    windows.append((None, context, continuation))
                    owner.append(i)
            totals = [0.0] * len(requests)
            for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows)):
                totals[i] += logp
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

            out = [""] * len(requests)
            groups: dict[str, list[int]] = {}
            for i, req in enumerate(requests):
                groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
            eos = self.tok.decode([self.tok.eos_id])
            for members in groups.values():
                kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), 256)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                new = int(kwargs.pop("max_gen_toks"))
                temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
                for start in range(0, len(members), self.batch_size):
                    batch = members[start:start + self.batch_size]
                    prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - new)
                               for i in batch]
                    for i, ids in zip(batch, generate_ids(self.model, prompts, new, temperature,
                                                          eos_id=self.tok.eos_id)):
                        text = self.tok.decode([t for t in ids if t != self.tok.eos_id])
                        for stop in until:
                            text = text.split(stop)[0] if stop else text
                        out[i] = text
            return out

    return JaxLM


def _scorer(model, mesh) -> Callable:
    """jit(tokens [b, t], targets [b, t]) -> (log p(target) [b, t], target is the argmax [b, t]),
    over `mesh`: params placed by the rules table, rows split over the batch axis."""
    from cpt_jax.models import params_of, spec

    s = spec(model.cfg)
    params = jax.device_put(params_of(model), sharding.param_shardings(s.abstract_params, s.axes, mesh))
    rows = sharding.batch_sharding(mesh)

    @jax.jit
    def score(params, tokens, targets):
        m = nnx.merge(s.graphdef, params)
        logits = m(tokens)
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return picked, jnp.argmax(logits, axis=-1) == targets

    def run(tokens: np.ndarray, targets: np.ndarray):
        with jax.set_mesh(mesh):
            logp, greedy = score(params, jax.device_put(tokens, rows), jax.device_put(targets, rows))
        return np.asarray(logp, np.float64), np.asarray(greedy)

    return run


def score_rows(score: Callable, rows: Sequence[tuple[list[int], int]], batch_size: int) -> list[tuple[float, bool]]:
    """(sum of log p over the last n tokens of each row, whether each was the argmax) for rows
    (tokens, n): the first token of a row is context only. Longest rows first, in batches of
    `batch_size` padded to a multiple of BUCKET tokens (padding on the right, after the row:
    causal attention keeps it out of every scored position)."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = BUCKET * math.ceil((len(rows[batch[0]][0]) - 1) / BUCKET)
        tokens = np.zeros((batch_size, width), np.int32)
        targets = np.zeros((batch_size, width), np.int32)
        for r, i in enumerate(batch):
            ids = rows[i][0]
            tokens[r, :len(ids) - 1], targets[r, :len(ids) - 1] = ids[:-1], ids[1:]
        logp, greedy = score(tokens, targets)
        for r, i in enumerate(batch):
            ids, n = rows[i]
            span = slice(len(ids) - 1 - n, len(ids) - 1)
            out[i] = (float(logp[r, span].sum()), bool(greedy[r, span].all()))
    return out


def evaluate(model, tokenizer, tasks: Sequence[str], limit: int | None = None, batch_size: int = 16,
             max_length: int = 2048, mesh=None, include_path: str | None = None, log_samples: bool = False) -> dict:
    """The harness's results dict for `tasks` (names, or groups of them) on this model; tasks of
    `include_path` (a dir of harness YAML) beside the harness's and cpt_jax's."""
    import lm_eval

    from cpt_jax import tasks as task_lib

    lm = make_lm(model, tokenizer, batch_size, max_length, mesh)
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit,
                                   task_manager=task_lib.manager(include_path), log_samples=log_samples,
                                   bootstrap_iters=0)


def metric_values(metrics: dict) -> dict[str, float]:
    """A task's metrics in the harness's results ("acc,none": 0.25, ...) by name, without
    their stderrs and bookkeeping (sample counts)."""
    return {k.split(",")[0]: float(v) for k, v in metrics.items()
            if "," in k and "stderr" not in k and isinstance(v, (int, float))}


def summary_lines(results: dict) -> list[str]:
    """One line per task: its metrics."""
    return [f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metric_values(metrics).items()))
            for task, metrics in sorted(results["results"].items())]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cpt_jax.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a run's workdir or a converted model's dir")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--tasks", required=True, help="comma-separated harness task or group names")
    p.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_length", type=int, default=2048, help="tokens of context at most")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
    p.add_argument("--include_path", default=None, help="a dir of your own harness task YAML files")
    p.add_argument("--output", default=None, help="results dir (default: WORKDIR/eval/step_N)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from cpt_jax import inference
    from cpt_jax import tasks as task_lib
    from cpt_jax.rundir import RunDir

    try:
        names = task_lib.resolve(a.tasks.split(","), a.include_path)  # before any model is loaded
        run = RunDir.of(a.workdir)
        step = run.latest_step() if a.step is None else a.step
        if step is None:
            raise FileNotFoundError(f"--workdir {a.workdir}: no checkpoint there")
        model, tokenizer = inference.load(a.workdir, step, a.dtype)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"evaluate error: {e}", file=sys.stderr)
        return 2
    results = evaluate(model, tokenizer, names, a.limit, a.batch_size, a.max_length, include_path=a.include_path)
    out = a.output or os.path.join(run.path, "eval", f"step_{step}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({k: results[k] for k in ("results", "groups", "configs", "versions", "n-shot", "higher_is_better")
                   if k in results}, f, indent=2, default=str)
    for line in summary_lines(results):
        print(line)
    log.info("results in %s", os.path.join(out, "results.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
