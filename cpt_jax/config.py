"""Every config field a run reads, with its default and its kinds (`_declared`). Config files
start from `base()`.

Field names are an interface: the sweep, the launch scripts and users' command lines
(`--config.optimizer.peak_lr=1e-4`) rely on them.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from types import SimpleNamespace
from typing import Any, NamedTuple

import ml_collections

from cpt_jax.errors import ConfigError

# How a field may change between the config that made a checkpoint and one that continues it
# (a field of no kind decides what a run computes: it must be the same):
RESUME = "resume"  # when a workdir resumes: how a run is shown, stored or computed, not what it computes
BRANCH = "branch"  # in a cooldown branch, beside RESUME's: its length, its schedule, what it starts from
# And what the field is: how the model computes (applied over the architecture of init_from).
NUMERICS = "numerics"


class Field(NamedTuple):
    default: Any
    kinds: frozenset[str]


def field(default: Any, *kinds: str) -> Field:
    """A config field's default and its kinds, declared together in `_declared`."""
    return Field(default, frozenset(kinds))


def load_file(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of a config file; `FILE.py:ARG` passes ARG, as the main job's --config does."""
    file, _, arg = path.partition(":")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"--config {file}: no such config file")
    spec = importlib.util.spec_from_file_location("_config_file", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def flatten(d: dict, prefix: str = "", whole: frozenset[str] = frozenset()) -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: config fields by their command-line names; a field named in
    `whole` keeps its dict as one value."""
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict) and f"{prefix}{k}" not in whole:
            flat.update(flatten(v, f"{prefix}{k}.", whole))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def expand_runs(config: ml_collections.ConfigDict, workdir: str) -> list[tuple[str, ml_collections.ConfigDict, str]]:
    """(name, config, workdir) for each run, each after the run it continues; a config without
    `runs` is one run in `workdir`. `init_from="run:<name>"` (or branch_from) becomes that sibling's workdir."""
    if "runs" not in config:
        return [("", config, workdir)]
    out = []
    base_ = copy.deepcopy(config)
    with base_.unlocked():
        del base_["runs"]
        if "report" in base_:
            del base_["report"]
    for name, overrides in config.runs.items():
        run = copy.deepcopy(base_)
        try:
            run.update_from_flattened_dict(flatten(overrides.to_dict(), whole=_mappings()))
        except (KeyError, AttributeError) as e:
            raise ConfigError(f"runs.{name}: unknown config field {e}") from None
        for field in ("init_from", "branch_from"):
            if run[field].startswith("run:"):
                run[field] = os.path.join(workdir, run[field][4:])
        out.append((name, run, os.path.join(workdir, name)))
    # A run starts after the run it continues (ConfigDict does not keep the file's key order).
    parent = lambda run: run.init_from or run.branch_from  # noqa: E731
    done: list = []
    while out:
        ready = next(r for r in out if not parent(r[1]).startswith(workdir + os.sep)
                     or any(parent(r[1]) == d[2] for d in done) or all(parent(r[1]) != o[2] for o in out))
        done.append(ready)
        out.remove(ready)
    return done


def _declared() -> SimpleNamespace:
    """Every field, its default and its kinds; sections are namespaces."""
    c = SimpleNamespace()
    c.seed = field(0)
    c.total_steps = field(1000, BRANCH)
    c.batch_size = field(32)  # global, in sequences
    c.seq_len = field(128)

    c.model = SimpleNamespace()
    c.model.size = field("tiny")  # a key of cpt_jax.models.SIZES, or "init_from": init_from's architecture
    c.model.vocab_size = field(0)  # 0: the tokenizer's vocabulary size
    # Compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU) | float32 | bfloat16; not float16, which would need
    # loss scaling. Params stay float32.
    c.model.dtype = field("auto", NUMERICS)
    c.model.scan_layers = field(True, RESUME, NUMERICS)
    c.model.remat = field("none", RESUME, NUMERICS)  # none | full | dots | dots_no_batch
    # auto (cuDNN on GPU, splash on TPU, else XLA) | xla | cudnn | splash
    c.model.attention = field("auto", RESUME, NUMERICS)
    # sequence positions per cross-entropy chunk (x local batch rows); 0: plain
    c.model.loss_chunk = field(256, RESUME, NUMERICS)
    c.model.rope_theta = field(10000.0)
    # transformers' rope_parameters over the model's own RoPE (a size's: rope_theta, unscaled; init_from's: its own):
    # rope_theta replaces the theta; rope_type (cpt_jax.models.rope.TYPES) with its keys replaces the scaling. E.g.
    # {"rope_theta": 5e5}, or {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}.
    c.model.rope_parameters = field({})
    c.model.tie_embeddings = field(False)
    c.model.qkv_bias = field(False)

    c.optimizer = SimpleNamespace()
    c.optimizer.peak_lr = field(2e-4, BRANCH)  # the paper's peak
    # cosine (the paper's) | wsd | constant | rsqrt (cpt_jax.update.schedule)
    c.optimizer.schedule = field("cosine", BRANCH)
    c.optimizer.warmup_frac = field(0.05, BRANCH)  # the paper's 5% warmup, from 0, counted from the run's own start
    # > 0: warmup steps, in place of warmup_frac (a WSD sweep's runs share it)
    c.optimizer.warmup_steps = field(0, BRANCH)
    c.optimizer.min_lr_frac = field(0.1, BRANCH)  # cosine and wsd end at 10% of peak
    c.optimizer.decay_frac = field(0.2, BRANCH)  # wsd: the decay takes the last 20% of the steps
    c.optimizer.decay_shape = field("1-sqrt", BRANCH)  # wsd: linear | 1-sqrt
    c.optimizer.b1 = field(0.9)
    c.optimizer.b2 = field(0.95)
    c.optimizer.eps = field(1e-8)
    # Decoupled (AdamW) weight decay on the weight matrices only, not on norm scales or biases (Megatron-LM, HF
    # Trainer); the output head always, the input embedding if decay_embeddings (Megatron-LM and HF Trainer: yes;
    # OLMo 2: no). cpt_jax.update.decayed says which leaves.
    c.optimizer.weight_decay = field(0.1)
    c.optimizer.decay_embeddings = field(True)
    c.optimizer.clip_norm = field(1.0)
    c.optimizer.grad_accum = field(1)  # microbatches per update
    # Parameters not trained (cpt_jax/freeze.py): paths like "embed", "layers/q", "layers/0-3"; "old_vocab": the
    # rows extend-vocab did not add. Frozen values stay bit-identical; wholly frozen ones keep no AdamW moments.
    c.optimizer.freeze = field(())

    c.data = SimpleNamespace()
    # prepared sources, tokenizers, token stores; "": $CPT_JAX_CACHE/data or ~/.cache/cpt_jax/data
    c.data.dir = field("", RESUME)
    # name -> source (cpt_jax/data/sources.py): kind "bible" (bundled KJV/CUV, lang en|zh), "files"
    # (paths, format txt|jsonl|parquet, text_field, eval_fraction) or "tfds" (tfds_name, split,
    # eval_split, text_feature, data_dir). Each has a held-out eval split, logged as eval/<name>/loss.
    c.data.sources = field(ml_collections.ConfigDict({
        "en": {"kind": "bible", "lang": "en"},
        "zh": {"kind": "bible", "lang": "zh"},
    }))
    # A files document that cannot be read as text (invalid UTF-8 or JSON, no text field, a null):
    # "error" fails the source naming it; "skip" leaves it out, counted in the log and store manifests.
    c.data.bad_documents = field("error")
    c.data.target = field("zh")  # the source being learned
    c.data.replay = field("en")  # the source replayed against forgetting
    c.data.replay_ratio = field(0.05)  # share of sequences drawn from `replay`; 0 disables replay
    c.data.weights = field({})  # {source: weight}: any number of sources, overrides the three above
    # ((start, replay ratio or {source: weight}), ...); start: a step, or a fraction of total_steps
    c.data.stages = field(())
    c.data.tokenizer = SimpleNamespace()
    c.data.tokenizer.path = field("")  # a sentencepiece .model or HF tokenizer.json (or a dir); "": train one
    c.data.tokenizer.vocab_size = field(8000)  # of the trained sentencepiece tokenizer
    c.data.tokenizer.model_type = field("bpe")  # bpe | unigram | bytes: UTF-8 bytes, 260 ids, nothing trained
    c.data.tokenizer.character_coverage = field(0.9995)  # CJK needs nearly all characters as pieces
    c.data.tokenizer.byte_fallback = field(True)  # anything else becomes UTF-8 bytes, never <unk>
    c.data.tokenizer.train_on = field(())  # source names; (): all sources
    c.data.tokenizer.max_docs = field(200_000)  # per source, evenly spaced: enough for a tokenizer
    # Each document is framed as [BOS] text EOS (cpt_jax/data/packing.py). bos: auto (the
    # tokenizer's convention: HF add_bos_token or post-processor; none for one trained here) |
    # always | never. eos: the token ending each document; "": the tokenizer's EOS.
    c.data.framing = field(ml_collections.ConfigDict({"bos": "auto", "eos": ""}))
    # concat: attention runs across the documents packed in a row; documents: it never crosses a
    # document boundary, positions (RoPE) restart at each document, and the position whose input is
    # EOS predicts nothing (the next document is not its continuation).
    c.data.packing = field("concat")
    c.data.eval_batches = field(0, RESUME)  # cap on eval batches per set; 0: the whole held-out set
    # processes tokenizing a store; 1: in-process (sentencepiece already uses every core)
    c.data.workers = field(1, RESUME)

    c.mesh = SimpleNamespace()
    # (data, fsdp, tensor) or (data, fsdp, tensor, context); one -1 fills the remaining devices. context > 1
    # splits each row's sequence over that many devices (ring attention; cpt_jax/models/context_parallel.py).
    c.mesh.shape = field((-1, 1, 1), RESUME)

    c.log_every = field(10, RESUME)
    c.eval_every = field(100, RESUME)
    c.eval_steps = field((), RESUME)  # plus held-out losses at these steps (e.g. dense over a CPT run's start)
    # > 0: the held-out losses also per bucket of this many positions (cpt_jax/positions.py); 0: none
    c.eval_position_bucket = field(0, RESUME)
    # Downstream tasks of lm-evaluation-harness (the [eval] extra) run in the loop: names or groups
    # (cpt_jax.tasks: bible_next_verse, cpt_paper; or any harness task), logged as
    # eval/<task>/<metric>, before the first step, every eval_tasks_every steps (0: none between)
    # and at the end; eval_tasks_limit caps the documents per task (0: all).
    c.eval_tasks = field((), RESUME)
    c.eval_tasks_every = field(0, RESUME)
    c.eval_tasks_limit = field(0, RESUME)
    c.checkpoint_every = field(100, RESUME)
    c.keep_checkpoints = field(2, RESUME)  # the last N
    c.keep_every = field(0, RESUME)  # plus every K-th step (0: none)
    # plus these steps, each saved and kept (the branch points of a WSD sweep's stable run)
    c.keep_steps = field((), RESUME)
    # A step whose loss or gradient norm is not finite is never applied. "stop": the run ends with
    # an error (found at the next log or checkpoint step; its last good checkpoint is kept);
    # "skip": it goes on, counting such steps (since the process started) as train/nonfinite_steps.
    c.nonfinite = field("stop", RESUME)
    c.inject_nan_at = field((), RESUME)  # fault injection for tests: steps whose gradients are made NaN
    # Params only, from another run's workdir (or its checkpoints dir), a converted model
    # (`python -m cpt_jax.convert import`), or a bundled pretrained model by name ("smollm2", "gemma3-270m").
    c.init_from = field("", BRANCH)
    # With init_from: also its latest AdamW moments (and their Adam count) where a leaf's shape matches; the
    # step and the LR schedule still start at 0. A converted model has none.
    c.init_from_optimizer = field(False, BRANCH)
    # A cooldown branch: this run starts from another run's checkpoint at `branch_step` (params,
    # optimizer state, step) and goes on with the same data stream; it may differ from that run
    # in total_steps and the LR schedule after branch_step only (e.g. a wsd decay after `constant`).
    c.branch_from = field("", BRANCH)
    c.branch_step = field(0, BRANCH)
    return c


def _mappings() -> frozenset[str]:
    """The fields whose keys the user picks (`data.weights`, `model.rope_parameters`: a plain dict
    by default): a run's override replaces such a field whole."""
    return frozenset(name for name, f in _flat_fields(_declared()).items() if type(f.default) is dict)


def _flat_fields(ns: SimpleNamespace, prefix: str = "") -> dict[str, Field]:
    out = {}
    for k, v in vars(ns).items():
        out.update(_flat_fields(v, f"{prefix}{k}.") if isinstance(v, SimpleNamespace) else {f"{prefix}{k}": v})
    return out


def _values(ns: SimpleNamespace) -> dict:
    return {k: _values(v) if isinstance(v, SimpleNamespace) else copy.deepcopy(v.default) for k, v in vars(ns).items()}


def base() -> ml_collections.ConfigDict:
    """Every config field a run reads, at its default."""
    return ml_collections.ConfigDict(_values(_declared()))


def fields(*kinds: str) -> tuple[str, ...]:
    """The fields (by command-line name) of any of these kinds; a field names its whole subtree
    (`data.sources` covers `data.sources.en.lang`)."""
    return tuple(name for name, f in _flat_fields(_declared()).items() if f.kinds & set(kinds))


def reference() -> str:
    """Every field's default and kinds as a Markdown table (docs/running.md holds it; a test keeps
    the two equal): `python -c "from cpt_jax.config import reference; print(reference())"`."""
    def code(value: Any) -> str:
        return "`" + json.dumps(value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value) + "`"

    rows = ["| field | default | may differ from the checkpoint it continues | numerics |", "|---|---|---|---|"]
    for name, f in _flat_fields(_declared()).items():
        change = ("on resume and in a branch" if RESUME in f.kinds else "in a branch" if BRANCH in f.kinds else "no")
        rows.append(f"| `{name}` | {code(f.default)} | {change} | {'yes' if NUMERICS in f.kinds else ''} |")
    return "\n".join(rows)


def few_steps(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`c` cut to 4 steps of 4 x 256 tokens that log, evaluate and checkpoint at the end: a large
    model's config seen running on a CPU (the `:cpu` mode of the pretrained-model configs)."""
    c.total_steps, c.batch_size, c.seq_len = 4, 4, 256
    c.data.eval_batches = 2
    c.log_every, c.eval_every, c.checkpoint_every = 1, 4, 4
    return c
