"""The checks of a run's config, each naming the field, before any expensive or irreversible work:

    check_config(config)          every field on its own, and the mesh over these devices
    check_workdir(workdir)        a directory this process can write
    check_resume(config, run)     a workdir resumes only the config that made it (RESUME fields may differ)
    check_start(config)           what the run starts from exists (init_from, branch_from's branch point)
    check_branch(config)          a cooldown branch continues its run (RESUME and BRANCH fields may differ)

Each raises ConfigError; a config that passes them all compiles and runs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import ml_collections
import numpy as np
from etils import epath

from cpt_jax import checkpoint, freeze, models, sharding, storage, tasks, update
from cpt_jax.config import BRANCH, NUMERICS, RESUME, base, fields, flatten
from cpt_jax.data import pipeline
from cpt_jax.data.packing import BOS_CHOICES, PACKINGS
from cpt_jax.data.tokenizer import MODEL_TYPES
from cpt_jax.errors import ConfigError
from cpt_jax.models import context_parallel
from cpt_jax.rundir import RunDir


def check_config(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    """Checks every field of a run that can be checked without the checkpoints it starts from
    (`check_start`); returns the mesh."""
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
    bucket = config.eval_position_bucket
    if not (isinstance(bucket, int) and 0 <= bucket < config.seq_len):
        raise ConfigError(f"eval_position_bucket={bucket!r} must be an integer in [0, seq_len={config.seq_len}): "
                          f"positions per bucket of the held-out loss by position, 0 for none")
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
    if config.data.tokenizer.model_type not in MODEL_TYPES:
        raise ConfigError(f"data.tokenizer.model_type={config.data.tokenizer.model_type!r}: must be one of {MODEL_TYPES}")
    if config.data.tokenizer.path and not epath.Path(config.data.tokenizer.path).exists():
        raise ConfigError(f"data.tokenizer.path={config.data.tokenizer.path!r} does not exist")
    if config.model.size == "init_from":
        if not (config.init_from or config.branch_from):
            raise ConfigError("model.size='init_from' takes the architecture of init_from, which is not set")
        try:  # its RoPE override now, over any RoPE; over init_from's once the run starts
            models.rope.override(1.0, (), config.model.rope_parameters.to_dict(), None)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    else:
        model_config(config, vocab_size=max(config.model.vocab_size, 1))
    try:
        mesh = sharding.make_mesh(config.mesh.shape, devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_context(config, sharding.context_size(mesh))
    dp, accum = sharding.data_parallel_size(mesh), config.optimizer.grad_accum
    if config.batch_size % (dp * accum):
        raise ConfigError(
            f"batch_size={config.batch_size} is not divisible by data-parallel size {dp} "
            f"(mesh data x fsdp) x optimizer.grad_accum={accum}")
    return mesh


def _check_context(config: ml_collections.ConfigDict, shards: int) -> None:
    """The sequence splits over the context axis of the mesh (`shards` devices): evenly, with a
    kernel that can attend across the split, into whole loss chunks."""
    if config.seq_len % shards:
        raise ConfigError(f"seq_len={config.seq_len} does not split over the context axis of mesh.shape="
                          f"{tuple(config.mesh.shape)} ({shards} devices): it must be a multiple of {shards}")
    if shards > 1 and config.model.attention not in context_parallel.KERNELS:
        raise ConfigError(f"model.attention={config.model.attention!r} cannot attend across the context axis of "
                          f"mesh.shape={tuple(config.mesh.shape)}: ring attention computes its blocks in XLA; use "
                          f"{' or '.join(context_parallel.KERNELS)}")
    local, chunk = config.seq_len // shards, config.model.loss_chunk
    if chunk and local % min(chunk, local):
        where = f"seq_len={config.seq_len}" if shards == 1 else f"the {local} positions per context shard"
        raise ConfigError(f"model.loss_chunk={chunk} does not divide {where}")


def check_run(config: ml_collections.ConfigDict, workdir: str, devices=None, allow_change: bool = False,
              start: bool = True) -> jax.sharding.Mesh:
    """Every check of a run in `workdir`; returns its mesh. `start=False` leaves out `check_start`,
    for a run whose starting point an earlier run of the same config makes."""
    mesh = check_config(config, devices)
    check_workdir(workdir)
    check_resume(config, RunDir.of(workdir), allow_change)
    if start:
        check_start(config)
    return mesh


def check_start(config: ml_collections.ConfigDict) -> None:
    """What the run starts from exists (init_from and its optimizer state, branch_from's branch
    point), and a branch continues its run (`check_branch`)."""
    if config.init_from and RunDir.of(config.init_from).latest_step() is None:
        raise ConfigError(f"init_from={config.init_from!r}: no checkpoint found there (a pretrained model "
                          f"becomes one with `python -m cpt_jax.convert import`)")
    if config.init_from_optimizer:
        src = RunDir.of(config.init_from)
        if not checkpoint.Checkpointer(src.checkpoints, read_only=True).has_opt_state(src.latest_step()):
            raise ConfigError(f"init_from_optimizer: init_from={config.init_from!r} has no optimizer state (step "
                              f"{src.latest_step()} holds params only, as a converted model does)")
    if config.branch_from:
        kept = checkpoint.all_steps(RunDir.of(config.branch_from).checkpoints)
        if config.branch_step not in kept:
            raise ConfigError(f"branch_from={config.branch_from!r} has no checkpoint at branch_step="
                              f"{config.branch_step} (it has {kept or 'none'}; keep_steps makes a run keep its "
                              f"branch points)")
        check_branch(config)


def _check_schedule(config: ml_collections.ConfigDict) -> None:
    opt, total = config.optimizer, config.total_steps
    if opt.schedule not in update.SCHEDULES:
        raise ConfigError(f"optimizer.schedule={opt.schedule!r} must be one of {', '.join(update.SCHEDULES)}")
    if opt.decay_shape not in update.DECAY_SHAPES:
        raise ConfigError(f"optimizer.decay_shape={opt.decay_shape!r} must be one of {', '.join(update.DECAY_SHAPES)}")
    if not 0.0 < opt.decay_frac <= 1.0:
        raise ConfigError(f"optimizer.decay_frac={opt.decay_frac} must be in (0, 1]")
    if not isinstance(opt.warmup_steps, int) or opt.warmup_steps < 0:
        raise ConfigError(f"optimizer.warmup_steps={opt.warmup_steps!r} must be a non-negative integer")
    if isinstance(total, int) and total > 0 and opt.schedule == "wsd":
        warmup, decay = update.warmup_steps(opt, total), update.decay_steps(opt, total)
        if warmup + decay > total:
            raise ConfigError(f"optimizer: warmup ({warmup} steps) and decay ({decay} steps, decay_frac="
                              f"{opt.decay_frac}) do not fit in total_steps={total}")
    if config.branch_from and config.init_from:
        raise ConfigError("init_from and branch_from are both set: a run starts from one of them")
    if config.branch_from and not (isinstance(config.branch_step, int) and 0 < config.branch_step < total):
        raise ConfigError(f"branch_step={config.branch_step!r} must be a step in (0, total_steps={total})")
    if config.branch_step and not config.branch_from:
        raise ConfigError(f"branch_step={config.branch_step} is set without branch_from")
    for name in ("keep_steps", "eval_steps"):
        bad = [s for s in config[name] if not (isinstance(s, int) and 0 < s <= total)]
        if bad:
            raise ConfigError(f"{name}: {bad[0]!r} is not a step in (0, total_steps={total}]")


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


def check_resume(config: ml_collections.ConfigDict, run: RunDir, allow_change: bool = False) -> None:
    """A workdir belongs to the config that made it: resuming it with a config that would compute
    something else fails, naming the fields, unless `allow_change`."""
    saved = run.read_config() if not allow_change else None
    if saved is None:
        return
    diff = config_diff(saved, config, fields(RESUME))
    if diff:
        raise ConfigError(f"workdir {run.path} was made by a different config ({diff}); use another workdir, "
                          f"or --allow_config_change to resume it anyway")


def config_diff(saved: dict, config: ml_collections.ConfigDict, allowed: tuple[str, ...]) -> str:
    """The fields (but `allowed` ones and those under them) in which `config` differs from a
    saved config, as `field: old -> new; ...`; "" where none."""
    # A field added to cpt_jax since `saved` was written reads as its default there: that is what
    # the older code computed. Only the fields `config` has: the entries of a named dict such as
    # data.sources are the user's, and a default entry the user left out is not one of them.
    new = flatten(json.loads(config.to_json()))
    old = {**{k: v for k, v in flatten(json.loads(base().to_json())).items() if k in new}, **flatten(saved)}
    for flat in (old, new):  # "auto" and what it means on this platform are the same dtype
        if flat.get("model.dtype", "auto") == "auto":
            flat["model.dtype"] = models.llama.compute_dtype("auto")
    ok = lambda k: any(k == f or k.startswith(f + ".") for f in allowed)  # noqa: E731
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and not ok(k))
    return "; ".join(f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in diff)


def check_branch(config: ml_collections.ConfigDict) -> None:
    """A cooldown branch continues its run exactly up to branch_step: the same config but for
    RESUME and BRANCH fields, the same data stream, and the same learning rate at every step before it."""
    parent = RunDir.of(config.branch_from)
    saved = parent.read_config()
    if saved is None:
        raise ConfigError(f"branch_from={config.branch_from!r} has no config.json: not a run's workdir")
    diff = config_diff(saved, config, fields(RESUME, BRANCH))
    if diff:
        raise ConfigError(f"branch_from={config.branch_from!r} was trained with another config ({diff}); "
                          f"a branch may change only {', '.join(fields(BRANCH))}")
    theirs = ml_collections.ConfigDict(saved)
    if pipeline.mixture_stages(theirs.data, theirs.total_steps) != pipeline.mixture_stages(config.data,
                                                                                           config.total_steps):
        raise ConfigError(f"branch_from={config.branch_from!r}: data.stages fall on other steps at total_steps="
                          f"{config.total_steps}; give the stages' starts as steps")
    steps = np.arange(config.branch_step)
    ours, before = update.schedule(config.optimizer, config.total_steps), update.schedule(theirs.optimizer,
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
        try:
            tasks.resolve(config.eval_tasks)
        except (ValueError, ImportError) as e:
            raise ConfigError(f"eval_tasks={tuple(config.eval_tasks)}: {e}") from None


def frozen_mask(config: ml_collections.ConfigDict, mcfg: models.ModelConfig, extension: dict | None,
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


def model_config(config: ml_collections.ConfigDict, vocab_size: int, source: dict | None = None,
                 seq_len: int | None = None, platform: str | None = None) -> models.ModelConfig:
    """The run's architecture: a named size, or (model.size="init_from") the architecture of the
    init_from checkpoint, `source` (its metadata's model), with this run's numerics and RoPE
    override (model.rope_parameters: a longer context's stage changes only that). With
    `seq_len`, the attention kernel is resolved for `platform` (default: this process's) and
    length: the one compiled."""
    m = config.model
    numerics = {name.removeprefix("model."): m[name.removeprefix("model.")] for name in fields(NUMERICS)}
    try:
        numerics["dtype"] = models.llama.compute_dtype(numerics["dtype"], platform)
        if m.size == "init_from":
            mcfg = models.ModelConfig.from_dict({**source, **numerics})
        else:
            mcfg = models.model_config(m.size, vocab_size, rope_theta=m.rope_theta, tie_embeddings=m.tie_embeddings,
                                       qkv_bias=m.qkv_bias, **numerics)
        theta, scaling = models.rope.override(mcfg.rope_theta, mcfg.rope_scaling, m.rope_parameters.to_dict(),
                                              mcfg.head_dim)
        mcfg = dataclasses.replace(mcfg, rope_theta=theta, rope_scaling=scaling)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return mcfg if seq_len is None else mcfg.with_kernel(seq_len, platform)
