"""EleutherAI's lm-evaluation-harness on the JAX model: a harness LM backed by cpt_jax parameters.

    scorer = Scorer(models.spec(cfg), tokenizer, batch_size=16, max_length=2048, mesh=mesh)  # once
    results = scorer.evaluate(params, ["bible_next_verse"], limit=100)  # any params of that spec

A `Scorer` compiles its scoring function once (one program per length bucket) and scores any
parameters of its model spec with it: the training loop builds one per run and evaluates each
step's parameters without recompiling. `evaluate(model, ...)` and `make_lm(model, ...)` are the
one-off forms for a loaded model (`cpt_jax.models.load`).

`loglikelihood` and `loglikelihood_rolling` score rows of tokens batched by length (rows sorted
longest first, padded to a bucket of BUCKET tokens and a fixed batch), sharded over the mesh's
batch axis as training is; `generate_until` decodes with the KV-cache generator, greedy or sampled
as the task's do_sample, temperature, top_k and top_p say, cut at its `until` strings. Requests
are tokenized as the harness's HF backend tokenizes them (BOS where the tokenizer's convention
adds it; a context's trailing spaces moved to the continuation; contexts truncated on the left to
`max_length`), so an exported model scored by that backend gets the same loglikelihoods.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpt_jax import sharding
from cpt_jax import tasks as task_lib
from cpt_jax.data.tokenizer import TokenizerLike
from cpt_jax.generation import generate_ids
from cpt_jax.models import Llama, ModelSpec, params_of, spec

BUCKET = 64  # rows are padded to a multiple of this many tokens: one compile per bucket
SAMPLING = {"temperature": float, "top_k": int, "top_p": float}  # what generate_until samples with


class Scorer:
    """The harness's scoring of one model spec, compiled once: `evaluate(params, tasks)` and
    `lm(params)` take any parameters of that spec (placed over `mesh` by the rules table)."""

    def __init__(self, model_spec: ModelSpec, tokenizer: TokenizerLike | None, batch_size: int = 16,
                 max_length: int = 2048, mesh: jax.sharding.Mesh | None = None):
        if tokenizer is None:
            raise ValueError("the checkpoint has no tokenizer dir: the harness scores text")
        self.spec, self.tokenizer = model_spec, tokenizer
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        self.mesh = mesh if mesh is not None else sharding.make_mesh((-1, 1, 1))
        if self.batch_size % sharding.data_parallel_size(self.mesh):
            raise ValueError(f"--batch_size {batch_size} must be a multiple of the "
                             f"{sharding.data_parallel_size(self.mesh)} data-parallel devices")
        self._params = sharding.param_shardings(model_spec.abstract_params, model_spec.axes, self.mesh)
        self._rows = sharding.batch_sharding(self.mesh)
        self._score = jax.jit(functools.partial(_logprobs, model_spec.graphdef))

    def score(self, params: dict, tokens: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(log p(target) [b, t] as float64, whether each target is the argmax [b, t])."""
        with jax.set_mesh(self.mesh):
            logp, greedy = self._score(params, jax.device_put(tokens, self._rows), jax.device_put(targets, self._rows))
        return np.asarray(logp, np.float64), np.asarray(greedy)

    def lm(self, params: dict):
        """A harness LM (`lm_eval.api.model.TemplateLM`) over these parameters."""
        return _jax_lm_class()(self, jax.device_put(params, self._params))

    def evaluate(self, params: dict, tasks: Sequence[str], limit: int | None = None, include_path: str | None = None,
                 log_samples: bool = False) -> dict:
        """The harness's results dict for `tasks` (names, or groups of them) on these parameters;
        tasks of `include_path` (a dir of harness YAML) beside the harness's and cpt_jax's."""
        lm = self.lm(params)  # first: it says how to install the harness where it is missing
        import lm_eval  # optional heavy dependency (the [eval] extra)

        return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit,
                                       task_manager=task_lib.manager(include_path), log_samples=log_samples,
                                       bootstrap_iters=0)


def _logprobs(graphdef, params: dict, tokens: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = nnx.merge(graphdef, params)(tokens)
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


def make_lm(model: Llama, tokenizer, batch_size: int = 16, max_length: int = 2048, mesh=None):
    """A harness LM over a loaded model and its tokenizer; `mesh`: where its params and batches
    live (default: every device, data-parallel)."""
    return Scorer(spec(model.cfg), tokenizer, batch_size, max_length, mesh).lm(params_of(model))


def evaluate(model: Llama, tokenizer, tasks: Sequence[str], limit: int | None = None, batch_size: int = 16,
             max_length: int = 2048, mesh=None, include_path: str | None = None, log_samples: bool = False) -> dict:
    """`Scorer.evaluate` once, on a loaded model."""
    return Scorer(spec(model.cfg), tokenizer, batch_size, max_length, mesh).evaluate(
        params_of(model), tasks, limit, include_path, log_samples)


def metric_values(metrics: dict) -> dict[str, float]:
    """A task's metrics in the harness's results ("acc,none": 0.25, ...) by name, without
    their stderrs and bookkeeping (sample counts)."""
    return {k.split(",")[0]: float(v) for k, v in metrics.items()
            if "," in k and "stderr" not in k and isinstance(v, (int, float))}


def score_rows(score: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
               rows: Sequence[tuple[list[int], int]], batch_size: int) -> list[tuple[float, bool]]:
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


def sampling_kwargs(gen_kwargs: dict) -> dict:
    """`generate_ids`' sampling arguments from a task's generation_kwargs as the harness normalises
    them (without until and max_gen_toks): greedy unless do_sample, as its HF backend decodes; then
    temperature, top_k (absent: all tokens) and top_p (absent: 1). Anything else is refused rather
    than ignored."""
    unknown = sorted(set(gen_kwargs) - {"do_sample", *SAMPLING})
    if unknown:
        raise ValueError(f"generation_kwargs {unknown} are not supported by cpt_jax's generate_until (it takes "
                         f"until, max_gen_toks, do_sample, {', '.join(SAMPLING)})")
    if not gen_kwargs.get("do_sample"):
        return {"temperature": 0.0}
    given = {k: gen_kwargs[k] for k in SAMPLING if gen_kwargs.get(k) is not None}
    return {k: SAMPLING[k](v) for k, v in given.items()}


@functools.cache  # one class, defined once the harness is importable
def _jax_lm_class() -> type:
    try:  # optional heavy dependency (the [eval] extra), imported where the harness is used
        from lm_eval.api.model import TemplateLM
    except ImportError:
        raise ImportError("downstream evaluation needs lm-evaluation-harness: pip install -e '.[eval]'") from None

    class JaxLM(TemplateLM):
        backend = "causal"

        def __init__(self, scorer: Scorer, params: dict):
            super().__init__()
            self.scorer, self.params, self.tok = scorer, params, scorer.tokenizer
            self.batch_size = scorer.batch_size

        # -- tokenization, as the HF backend does it
        @property
        def eot_token_id(self) -> int:
            return self.tok.eos_id

        @property
        def prefix_token_id(self) -> int:
            return self.tok.eos_id if self.tok.bos_id is None else self.tok.bos_id

        @property
        def max_length(self) -> int:
            return self.scorer.max_length

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
            return score_rows(functools.partial(self.scorer.score, self.params), rows, self.batch_size)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            from lm_eval import utils  # the harness, as above

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
            from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs  # the harness, as above

            model = nnx.merge(self.scorer.spec.graphdef, self.params)
            out = [""] * len(requests)
            groups: dict[str, list[int]] = {}
            for i, req in enumerate(requests):
                groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
            eos, stops = self.tok.decode([self.tok.eos_id]), [self.tok.eos_id]
            for members in groups.values():
                kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), 256)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                new = int(kwargs.pop("max_gen_toks"))
                sampling = sampling_kwargs(kwargs)
                for start in range(0, len(members), self.batch_size):
                    batch = members[start:start + self.batch_size]
                    prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - new)
                               for i in batch]
                    for i, ids in zip(batch, generate_ids(model, prompts, new, **sampling, stop_ids=stops)):
                        text = self.tok.decode([t for t in ids if t != self.tok.eos_id])
                        for stop in until:
                            text = text.split(stop)[0] if stop else text
                        out[i] = text
            return out

    return JaxLM
