"""Every config field a run reads, with its default. Config files start from `base()`.

Field names are an interface: the sweep, the launch scripts and users' command lines
(`--config.optimizer.peak_lr=1e-4`) rely on them.
"""

from __future__ import annotations

import copy
import importlib.util
import os

import ml_collections

from cpt_jax.errors import ConfigError


def load_file(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of a config file; `FILE.py:ARG` passes ARG, as the main job's --config does."""
    file, _, arg = path.partition(":")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"--config {file}: no such config file")
    spec = importlib.util.spec_from_file_location("_config_file", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: config fields by their command-line names."""
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
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
            run.update_from_flattened_dict(flatten(overrides.to_dict()))
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


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 32  # global, in sequences
    c.seq_len = 128

    c.model = ml_collections.ConfigDict()
    c.model.size = "tiny"  # a key of cpt_jax.models.SIZES, or "init_from": init_from's architecture
    c.model.vocab_size = 0  # 0: the tokenizer's vocabulary size
    c.model.dtype = "auto"  # compute dtype; auto: bfloat16 on GPU/TPU, float32 on CPU. Params stay float32.
    c.model.scan_layers = True
    c.model.remat = "none"  # none | full | dots | dots_no_batch
    c.model.attention = "auto"  # auto (cuDNN on GPU, splash on TPU, else XLA) | xla | cudnn | splash
    c.model.loss_chunk = 256  # sequence positions per cross-entropy chunk (x local batch rows); 0: plain
    c.model.rope_theta = 10000.0
    c.model.tie_embeddings = False
    c.model.qkv_bias = False

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.peak_lr = 2e-4  # the paper's peak
    c.optimizer.schedule = "cosine"  # cosine (the paper's) | wsd | constant | rsqrt (cpt_jax.train.schedule)
    c.optimizer.warmup_frac = 0.05  # the paper's 5% warmup, from 0, counted from the run's own start
    c.optimizer.warmup_steps = 0  # > 0: warmup steps, in place of warmup_frac (a WSD sweep's runs share it)
    c.optimizer.min_lr_frac = 0.1  # cosine and wsd end at 10% of peak
    c.optimizer.decay_frac = 0.2  # wsd: the decay takes the last 20% of the steps
    c.optimizer.decay_shape = "1-sqrt"  # wsd: linear | 1-sqrt
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.1
    c.optimizer.clip_norm = 1.0
    c.optimizer.grad_accum = 1  # microbatches per update
    # Parameters not trained (cpt_jax/freeze.py): paths like "embed", "layers/q", "layers/0-3"; "old_vocab": the
    # rows extend-vocab did not add. Frozen values stay bit-identical; wholly frozen ones keep no AdamW moments.
    c.optimizer.freeze = ()

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""  # prepared sources, tokenizers, token stores; "": $CPT_JAX_CACHE/data or ~/.cache/cpt_jax/data
    # name -> source (cpt_jax/data/sources.py): kind "bible" (bundled KJV/CUV, lang en|zh), "files"
    # (paths, format txt|jsonl|parquet, text_field, eval_fraction) or "tfds" (tfds_name, split,
    # eval_split, text_feature, data_dir). Each has a held-out eval split, logged as eval/<name>/loss.
    c.data.sources = ml_collections.ConfigDict({
        "en": {"kind": "bible", "lang": "en"},
        "zh": {"kind": "bible", "lang": "zh"},
    })
    # A files document that cannot be read as text (invalid UTF-8 or JSON, no text field, a null):
    # "error" fails the source naming it; "skip" leaves it out, counted in the log and store manifests.
    c.data.bad_documents = "error"
    c.data.target = "zh"  # the source being learned
    c.data.replay = "en"  # the source replayed against forgetting
    c.data.replay_ratio = 0.05  # share of sequences drawn from `replay`; 0 disables replay
    c.data.weights = ml_collections.ConfigDict()  # {source: weight}: any number of sources, overrides the three above
    c.data.stages = ()  # ((start, replay ratio or {source: weight}), ...); start: a step, or a fraction of total_steps
    c.data.tokenizer = ml_collections.ConfigDict()
    c.data.tokenizer.path = ""  # a sentencepiece .model or HF tokenizer.json (or a dir); "": train one
    c.data.tokenizer.vocab_size = 8000  # of the trained sentencepiece tokenizer
    c.data.tokenizer.model_type = "bpe"  # bpe | unigram
    c.data.tokenizer.character_coverage = 0.9995  # CJK needs nearly all characters as pieces
    c.data.tokenizer.byte_fallback = True  # anything else becomes UTF-8 bytes, never <unk>
    c.data.tokenizer.train_on = ()  # source names; (): all sources
    c.data.tokenizer.max_docs = 200_000  # per source, evenly spaced: enough for a tokenizer
    # Each document is framed as [BOS] text EOS (cpt_jax/data/packing.py). bos: auto (the
    # tokenizer's convention: HF add_bos_token or post-processor; none for one trained here) |
    # always | never. eos: the token ending each document; "": the tokenizer's EOS.
    c.data.framing = ml_collections.ConfigDict({"bos": "auto", "eos": ""})
    # concat: attention runs across the documents packed in a row; documents: it never crosses a
    # document boundary, positions (RoPE) restart at each document, and the position whose input is
    # EOS predicts nothing (the next document is not its continuation).
    c.data.packing = "concat"
    c.data.eval_batches = 0  # cap on eval batches per set; 0: the whole held-out set
    c.data.workers = 1  # processes tokenizing a store; 1: in-process (sentencepiece already uses every core)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); one -1 fills the remaining devices

    c.log_every = 10
    c.eval_every = 100
    # Downstream tasks of lm-evaluation-harness (the [eval] extra) run in the loop: names or groups
    # (cpt_jax.tasks: bible_next_verse, cpt_paper; or any harness task), logged as
    # eval/<task>/<metric>, before the first step, every eval_tasks_every steps (0: none between)
    # and at the end; eval_tasks_limit caps the documents per task (0: all).
    c.eval_tasks = ()
    c.eval_tasks_every = 0
    c.eval_tasks_limit = 0
    c.checkpoint_every = 100
    c.keep_checkpoints = 2  # the last N
    c.keep_every = 0  # plus every K-th step (0: none)
    c.keep_steps = ()  # plus these steps, each saved and kept (the branch points of a WSD sweep's stable run)
    # A step whose loss or gradient norm is not finite is never applied. "stop": the run ends with
    # an error (found at the next log or checkpoint step; its last good checkpoint is kept);
    # "skip": it goes on, counting such steps (since the process started) as train/nonfinite_steps.
    c.nonfinite = "stop"
    c.inject_nan_at = ()  # fault injection for tests: steps whose gradients are made NaN
    # Params only, from another run's workdir (or its checkpoints dir), a converted model
    # (`python -m cpt_jax.convert import`), or a bundled pretrained model by name ("smollm2", "gemma3-270m").
    c.init_from = ""
    # With init_from: also its latest AdamW moments (and their Adam count) where a leaf's shape matches; the
    # step and the LR schedule still start at 0. A converted model has none.
    c.init_from_optimizer = False
    # A cooldown branch: this run starts from another run's checkpoint at `branch_step` (params,
    # optimizer state, step) and goes on with the same data stream; it may differ from that run
    # in total_steps and the LR schedule after branch_step only (e.g. a wsd decay after `constant`).
    c.branch_from = ""
    c.branch_step = 0
    return c


def few_steps(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`c` cut to 4 steps of 4 x 256 tokens that log, evaluate and checkpoint at the end: a large
    model's config seen running on a CPU (the `:cpu` mode of the pretrained-model configs)."""
    c.total_steps, c.batch_size, c.seq_len = 4, 4, 256
    c.data.eval_batches = 2
    c.log_every, c.eval_every, c.checkpoint_every = 1, 4, 4
    return c
