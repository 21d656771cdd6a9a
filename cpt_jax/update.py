"""The pure-functional update (`train_step`, `eval_step`, optimizer, schedule) and `compile_steps`,
which jits them over a mesh with explicit in/out shardings and a donated state.

`train_step(state, batch, schedule) -> (state, metrics)` touches no globals, no host and no mesh:
arrays in, arrays out. Where it runs and how it is sharded is decided once, in `compile_steps`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cpt_jax import freeze, models, sharding
from cpt_jax.models.cross_entropy import cross_entropy, positions_counted


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: dict  # float32 pure dict
    opt_state: Any


SCHEDULES = ("cosine", "wsd", "constant", "rsqrt")
DECAY_SHAPES = ("linear", "1-sqrt")


def warmup_steps(opt, total_steps: int) -> int:
    """`optimizer.warmup_steps`, else `warmup_frac` of the run's steps (at least 1)."""
    return opt.warmup_steps or max(1, int(round(opt.warmup_frac * total_steps)))


def decay_steps(opt, total_steps: int) -> int:
    """The steps of a WSD run's decay: its last `decay_frac` (at least 1). A cooldown branch of a
    WSD sweep starts at total_steps - decay_steps."""
    return max(1, int(round(opt.decay_frac * total_steps)))


def schedule_args(opt, total_steps: int) -> dict[str, np.ndarray]:
    """A run's schedule as numbers: an argument of the compiled step, not constants in it, so runs
    that differ only in their schedule or length (a stable phase and its cooldown branches, the
    CPT runs of a replay study) share one compiled program through the compilation cache."""
    warmup, decay = warmup_steps(opt, total_steps), decay_steps(opt, total_steps)
    f32 = np.float32
    return {"kind": np.int32(SCHEDULES.index(opt.schedule)), "sqrt_decay": np.bool_(opt.decay_shape == "1-sqrt"),
            "peak": f32(opt.peak_lr), "floor": f32(opt.peak_lr * opt.min_lr_frac), "warmup": f32(warmup),
            "cosine_end": f32(max(total_steps, warmup + 1)), "decay_start": f32(total_steps - decay),
            "decay": f32(decay)}


def learning_rate(step, args: dict) -> jax.Array:
    """The learning rate at a step of a run, counted from the run's own start (so a run that
    starts from init_from warms up again from 0; a cooldown branch continues its stable run's
    step). Linear warmup from 0 over `warmup` steps, then:

      cosine    cosine to min_lr_frac x peak at the last step (the paper's)
      wsd       stable at peak, then a decay over the last decay_frac of the steps to
                min_lr_frac x peak, linear or 1-sqrt (Hägele et al. 2024)
      constant  peak for good (a WSD sweep's stable phase)
      rsqrt     peak x sqrt(warmup / step)
    """
    a = args
    step = jnp.asarray(step, jnp.float32)
    span = jnp.clip((step - a["warmup"]) / (a["cosine_end"] - a["warmup"]), 0.0, 1.0)
    cosine = a["floor"] + (a["peak"] - a["floor"]) * 0.5 * (1 + jnp.cos(jnp.pi * span))
    t = jnp.clip((step - a["decay_start"]) / a["decay"], 0.0, 1.0)
    wsd = a["peak"] - (a["peak"] - a["floor"]) * jnp.where(a["sqrt_decay"], jnp.sqrt(t), t)  # 1-sqrt: 1 - sqrt(t)
    rsqrt = a["peak"] * jnp.sqrt(a["warmup"] / jnp.maximum(step, a["warmup"]))
    after = jnp.select([a["kind"] == 0, a["kind"] == 1, a["kind"] == 2], [cosine, wsd, a["peak"]], rsqrt)
    return jnp.where(step < a["warmup"], a["peak"] * step / a["warmup"], after)


def schedule(opt, total_steps: int) -> optax.Schedule:
    """The run's learning rate as a function of the step (`learning_rate` of its `schedule_args`)."""
    args = schedule_args(opt, total_steps)
    return lambda step: learning_rate(step, args)


def decayed(params: dict, embeddings: bool = True) -> dict:
    """Per leaf, whether weight decay applies: to the weight matrices, not to norm scales or
    biases (as Megatron-LM and HF Trainer do). Decided by what a leaf is, not by its rank: the
    per-layer leaves are stacked [layers, ...], so every norm scale and bias has rank >= 2. The
    output head is a matrix like the others; the input embedding decays where `embeddings`, a
    choice because the families' reference trainers differ there (Megatron-LM and HF Trainer
    decay it, OLMo 2's OLMo-core does not). A tied table is both and follows `embeddings`."""
    def one(keypath, _) -> bool:
        path = tuple(str(k.key) for k in keypath)
        return embeddings if path == ("embed",) else not path[-1].endswith(("norm", "_bias"))
    return jax.tree_util.tree_map_with_path(one, params)


def scale_by_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """optax.scale_by_adam, but with an Adam count per row of each leaf (freeze.row_axis: per
    vocabulary row of the embedding and head, per layer of a stacked leaf, one for any other
    leaf) in place of one count for the whole state. A run that starts from another run's
    moments (init_from_optimizer, checkpoint.restore_moments) keeps their count for them, while
    the moments that start at zero there (no match in the source, or frozen in it) start their own
    bias correction from 0, as a fresh AdamW would; under one mature count their first updates
    would be 0.45x-6.5x the proper size. In a run of its own every count is the same."""
    def counts(params):
        def one(keypath, p):
            axis = freeze.row_axis(keypath)
            return jnp.zeros(() if axis is None else [p.shape[axis] if i == axis else 1 for i in range(p.ndim)],
                             jnp.int32)
        return jax.tree_util.tree_map_with_path(one, params)

    def init(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
        return optax.ScaleByAdamState(count=counts(params), mu=zeros(), nu=zeros())

    def update(updates, state, params=None):
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = jax.tree.map(optax.safe_increment, state.count)
        # optax's bias correction, with each row's own count
        scaled = lambda m, v, c: (m / (1 - b1 ** c).astype(m.dtype)) / (  # noqa: E731
            jnp.sqrt(v / (1 - b2 ** c).astype(v.dtype)) + eps)
        return jax.tree.map(scaled, mu, nu, count), optax.ScaleByAdamState(count=count, mu=mu, nu=nu)
    return optax.GradientTransformation(init, update)


def optimizer(opt, args: dict, lr: jax.Array | None = None, frozen: freeze.Mask | None = None
              ) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; weight decay on the leaves `decayed` names (matrices,
    the input embedding as `opt.decay_embeddings` says); the learning rate of `schedule_args`.
    The state has one layout whatever the schedule, so a branch restores its stable run's state.

    `lr`: this step's learning rate (train_step passes the one of its TrainState.step), in place
    of optax's own count: a run that starts with another run's moments (init_from_optimizer)
    keeps their Adam counts for the bias correction (`scale_by_adam`) but warms up from its own
    step 0. The schedule's count stays in the state, unused, so that the state's layout is
    optax.adamw's but for the Adam counts.

    `frozen` (freeze.resolve): wholly frozen leaves go through set_to_zero and keep no moments;
    frozen slices of the others get zero gradients in and zero updates out. The global norm is
    clipped over the trainable entries only: frozen gradients are never applied, so they should
    not shrink the ones that are.
    """
    schedule_fn = (lambda count: learning_rate(count, args)) if lr is None else (lambda _count: lr)
    tx = optax.chain(
        optax.clip_by_global_norm(opt.clip_norm),
        optax.chain(scale_by_adam(opt.b1, opt.b2, opt.eps),  # optax.adamw's chain
                    optax.add_decayed_weights(opt.weight_decay, lambda params: decayed(params, opt.decay_embeddings)),
                    optax.scale_by_learning_rate(schedule_fn)),
    )
    if frozen is None:
        return tx
    tx = optax.chain(optax.stateless(lambda g, _=None: freeze.zero_frozen(g, frozen)), tx,
                     freeze.masked_updates(frozen))
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, freeze.labels(frozen))


def document_layout(inputs: jax.Array, eos_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The packed documents of input rows [b, t] (`data.packing="documents"`): a document starts
    at the row's start and after each EOS. Returns (segment ids [b, t] int32, counting from 1 in
    each row; positions [b, t] int32 from 0 at each document's start, or the row's where a document
    continues from the row before; loss weights [b, t] float32, 0 where the input is EOS, whose
    target opens the next document and is not predictable from this one)."""
    t = inputs.shape[1]
    is_eos = inputs == eos_id
    starts = jnp.concatenate([jnp.ones_like(is_eos[:, :1]), is_eos[:, :-1]], axis=1)
    segments = jnp.cumsum(starts, axis=1, dtype=jnp.int32)
    index = jnp.arange(t, dtype=jnp.int32)
    positions = index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return segments, positions, (~is_eos).astype(jnp.float32)


def token_losses(graphdef, params: dict, tokens: jax.Array, document_end: int | None = None,
                 count: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Next-token cross-entropy of tokens [b, seq+1]: (the mean, differentiable; per position
    [b, seq] float32, for reporting; the weights of the positions that count, or None where all
    do), with the logits chunked as `model.loss_chunk` says. `document_end`: the EOS id of rows
    packed as documents (`document_layout`); None: attention runs across the whole row.
    `count`: the mean's divisor in place of these rows' counted positions (`counted`)."""
    model = nnx.merge(graphdef, params)
    inputs = tokens[:, :-1]
    loss = lambda x, weights: cross_entropy(x, model.head_weight(), tokens[:, 1:], model.cfg.loss_chunk,  # noqa: E731
                                            weights, model.cfg.final_softcap, count)
    if document_end is None:
        x, _ = model.hidden_states(inputs)
        return *loss(x, None), None
    segments, positions, weights = document_layout(inputs, document_end)
    x, _ = model.hidden_states(inputs, positions, segment_ids=segments)
    return *loss(x, weights), weights


def counted(tokens: jax.Array, document_end: int | None = None) -> jax.Array:
    """How many positions of tokens [b, seq+1] the loss counts (at least 1): all b x seq, or,
    packed as documents, those whose input is not EOS."""
    weights = None if document_end is None else document_layout(tokens[:, :-1], document_end)[2]
    return positions_counted(weights, tokens[:, 1:].shape)


def _loss_and_stats(params, graphdef, tokens, source, num_sources, document_end, count):
    """(loss: the sum of these rows' counted token losses / `count`, (per source: the sum of its
    counted token losses, their number)): sums, so that they add up over microbatches."""
    loss, per_token, weights = token_losses(graphdef, params, tokens, document_end, count)
    weights = jnp.ones_like(per_token) if weights is None else weights
    onehot = jax.nn.one_hot(source, num_sources, dtype=jnp.float32)  # [b, sources]
    return loss, (onehot.T @ (per_token * weights).sum(axis=1), onehot.T @ weights.sum(axis=1))


def train_step(state: TrainState, batch: dict, schedule: dict, *, graphdef, opt, num_sources: int,
               grad_accum: int = 1, nan_steps: tuple[int, ...] = (), frozen: freeze.Mask | None = None,
               document_end: int | None = None) -> tuple[TrainState, dict]:
    """One optimizer update on `batch` = {"tokens": [b, seq+1] int32, "source": [b] int32}, at
    the learning rate of `schedule` (`schedule_args`) and `opt`'s AdamW settings; `document_end`
    as in `token_losses`.

    The loss is the mean over the batch's counted positions (`counted`). With `grad_accum` > 1 the
    batch is split into that many microbatches, each contributing the sum of its token losses
    over the whole batch's count (HF Trainer's num_items_in_batch): their losses and gradients
    add up to the whole batch's, whatever each counts (packed as documents, rows count different
    numbers of positions), with less activation memory.
    `source_loss_sum` / `source_count`: per source, the sum of its counted token losses and their
    number (a token-weighted mean once divided).
    A step whose loss or gradient norm is not finite changes nothing but the step counter and
    reports `nonfinite` = 1; what then happens is the caller's choice (stop or go on).
    `nan_steps`: fault injection for tests, steps (counted from 1) whose gradients become NaN.
    `frozen`: the static freeze.Mask of `optimizer.freeze` (None: everything trains).
    """
    lr = learning_rate(state.step, schedule)
    tx = optimizer(opt, schedule, lr, frozen)
    grad_fn = jax.value_and_grad(_loss_and_stats, has_aux=True)
    tokens, source = batch["tokens"], batch["source"]
    count = counted(tokens, document_end)

    def micro(tokens, source):
        (loss, (src_sum, src_cnt)), grads = grad_fn(state.params, graphdef, tokens, source, num_sources,
                                                    document_end, count)
        return loss, src_sum, src_cnt, grads

    if grad_accum == 1:
        loss, src_sum, src_cnt, grads = micro(tokens, source)
    else:
        split = lambda x: x.reshape(grad_accum, -1, *x.shape[1:])  # noqa: E731
        def body(acc, xs):
            tok = sharding.constrain(xs[0], ("batch", "length"))
            return jax.tree.map(jnp.add, acc, micro(tok, xs[1])), None

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(micro, split(tokens)[0], split(source)[0]))
        total, _ = jax.lax.scan(body, zeros, (split(tokens), split(source)))
        loss, src_sum, src_cnt, grads = total

    if nan_steps:
        inject = jnp.isin(state.step + 1, jnp.asarray(nan_steps))
        grads = jax.tree.map(lambda g: jnp.where(inject, jnp.nan, g), grads)
    grads = freeze.zero_frozen(grads, frozen)  # the norm (and finiteness) of what is trained
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = freeze.apply_updates(state.params, updates, frozen)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    metrics = {
        "loss": loss,
        "nonfinite": 1 - finite.astype(jnp.int32),
        "grad_norm": grad_norm,
        "lr": lr,
        "source_loss_sum": src_sum,
        "source_count": src_cnt,
    }
    return TrainState(state.step + 1, params, opt_state), metrics


def eval_step(params: dict, tokens: jax.Array, valid: jax.Array, *, graphdef, document_end: int | None = None
              ) -> tuple[jax.Array, jax.Array]:
    """Sums of token cross-entropies over the `valid` rows and their token counts, per position
    [seq] (from each document's start where rows are packed as documents), to be summed over
    batches and divided once: the mean over a whole eval set whatever its batching and padding,
    and by position (`positions.buckets`)."""
    _, losses, weights = token_losses(graphdef, params, tokens, document_end)
    kept = jnp.broadcast_to(valid[:, None], losses.shape)
    if weights is None:
        return (losses * kept).sum(0), kept.sum(0)
    kept = kept * weights
    where = document_layout(tokens[:, :-1], document_end)[1]  # a token's position in its document
    zeros = jnp.zeros(losses.shape[1], jnp.float32)
    return zeros.at[where].add(losses * kept), zeros.at[where].add(kept)


class Steps(NamedTuple):
    """The compiled program of a run and the shardings it was compiled for."""

    spec: models.ModelSpec
    state_sharding: TrainState
    batch_sharding: dict  # tokens [b, seq+1], source [b], valid [b]
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings (for restore)
    init_params: Callable  # key -> params, born sharded
    init_opt_state: Callable  # params -> opt_state, born sharded
    train: Callable  # (state, batch) -> (state, metrics) at the run's schedule; donates state
    program: Any  # the compiled train step (as_text, cost and memory analyses)
    eval: Callable  # (params, tokens, valid) -> (loss sums [seq], token counts [seq])
    memory: Any  # the compiled train step's memory analysis


def compile_steps(mcfg: models.ModelConfig, opt, total_steps: int, mesh, batch_size: int, seq_len: int,
                  num_sources: int, nan_steps: tuple[int, ...] = (), frozen: freeze.Mask | None = None,
                  document_end: int | None = None) -> Steps:
    """Shardings from the logical-axis rules, then the train step compiled ahead of time.
    `frozen`: the resolved `optimizer.freeze` (the trainer's, which knows an extended model's old
    vocabulary); None: `opt.freeze` resolved here. `document_end`: the EOS id of rows packed as
    documents (`token_losses`); None: concat."""
    spec = models.spec(mcfg)
    args = schedule_args(opt, total_steps)
    if frozen is None:
        frozen = freeze.resolve(opt.get("freeze", ()), spec.abstract_params)
    tx = optimizer(opt, args, frozen=frozen)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    p_sh = sharding.param_shardings(spec.abstract_params, spec.axes, mesh)
    abstract_opt = jax.eval_shape(tx.init, spec.abstract_params)
    o_sh = freeze.state_shardings(abstract_opt, spec.abstract_params, p_sh, replicated)  # moments as their params
    state_sh = TrainState(step=replicated, params=p_sh, opt_state=o_sh)
    batch_sh = {"tokens": sharding.batch_sharding(mesh, 2), "source": sharding.batch_sharding(mesh, 1),
                "valid": sharding.batch_sharding(mesh, 1)}
    with_sharding = lambda tree, sh: jax.tree.map(  # noqa: E731
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
    abstract_state = with_sharding(
        TrainState(jax.ShapeDtypeStruct((), jnp.int32), spec.abstract_params, abstract_opt), state_sh)

    train_jit = jax.jit(
        functools.partial(train_step, graphdef=spec.graphdef, opt=opt, num_sources=num_sources,
                          grad_accum=opt.grad_accum, nan_steps=tuple(nan_steps), frozen=frozen,
                          document_end=document_end),
        in_shardings=(state_sh, {"tokens": batch_sh["tokens"], "source": batch_sh["source"]}, replicated),
        out_shardings=(state_sh, None), donate_argnums=0,
    )
    abstract_batch = {
        "tokens": jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32, sharding=batch_sh["tokens"]),
        "source": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch_sh["source"]),
    }
    with jax.set_mesh(mesh):
        compiled = train_jit.lower(abstract_state, abstract_batch, jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), args)).compile()
    # On the devices at the first step, not here: a mesh of a TPU topology compiled for on another
    # machine (cpt_jax.aot) takes no arrays.
    schedule = functools.cache(lambda: jax.device_put(args, replicated))
    return Steps(
        spec=spec, state_sharding=state_sh, batch_sharding=batch_sh, abstract_state=abstract_state,
        init_params=jax.jit(functools.partial(models.init_params, mcfg), out_shardings=p_sh),
        init_opt_state=jax.jit(tx.init, out_shardings=o_sh),
        train=lambda state, batch: compiled(state, batch, schedule()), program=compiled,
        eval=jax.jit(functools.partial(eval_step, graphdef=spec.graphdef, document_end=document_end),
                     in_shardings=(p_sh, batch_sh["tokens"], batch_sh["valid"])),
        memory=compiled.memory_analysis(),
    )
