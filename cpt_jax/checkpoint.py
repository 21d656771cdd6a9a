"""Orbax checkpoints of a run: params, optimizer state and JSON metadata, saved asynchronously.

A step directory holds three items so that each reader takes only what it needs: `params`
(what `init_from` and the Colab loader read), `opt_state` (resume only) and `meta` (the run's
config, the model layout, the tokenizer fingerprint). The manager keeps the last `keep` steps
plus every `keep_every`-th one and the `keep_steps` (a WSD stable run's branch points):
intermediate checkpoints are data points for scaling-law fits.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from cpt_jax import distributed, freeze, storage

# Stored in `meta`; bump when the stored tree changes shape, so old checkpoints are refused clearly.
LAYOUT = "stacked-layers-v1"
# The version of `Meta`; bump when a field changes meaning. Checkpoints from before it existed are 0.
META_VERSION = 1
log = logging.getLogger("cpt_jax")


@dataclasses.dataclass(frozen=True)
class Meta:
    """What a checkpoint stores beside its arrays (its JSON `meta` item). Model-agnostic: the
    model is the dict of its config (`models.ModelConfig.from_dict` reads it back)."""

    model: dict
    tokenizer: str | None = None  # the fingerprint of the tokenizer the model speaks
    config: dict | None = None  # the config of the run that saved it; None for a converted model
    sources: tuple[str, ...] = ()  # the run's data sources, in the mixture's order
    framing: dict | None = None  # {"bos_id", "eos_id", "packing"} of the run's rows
    vocab_extension: dict | None = None  # extend-vocab's report ("old_vocab_size": the rows it did not add)
    hf_config: dict | None = None  # an imported model's HF config.json (export writes it back)
    converted_from: str | None = None  # an imported model's source path
    step: int = 0
    layout: str = LAYOUT
    version: int = META_VERSION

    @classmethod
    def from_json(cls, d: dict, where: str) -> Meta:
        """A checkpoint's stored meta; a field added since it was written takes its default."""
        if d.get("layout") != LAYOUT:
            raise ValueError(f"checkpoint {where} has layout {d.get('layout')!r}, this cpt_jax reads {LAYOUT!r}")
        version = d.get("version", 0)
        if version > META_VERSION:
            raise ValueError(f"checkpoint {where} has metadata version {version}; this cpt_jax reads up to "
                             f"{META_VERSION}: update cpt_jax")
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        return cls(**{**d, "sources": tuple(d.get("sources", ())), "version": version})

    def to_json(self, step: int) -> dict:
        return {**dataclasses.asdict(self), "step": int(step), "layout": LAYOUT, "version": META_VERSION}


def latest_step(directory: str) -> int | None:
    """The latest complete step in a checkpoints dir; None where there is none, or no dir."""
    steps = all_steps(directory)
    return max(steps) if steps else None


def all_steps(directory: str) -> list[int]:
    """The complete steps in a checkpoints dir, in order ([] where there is no dir)."""
    if not epath.Path(directory).is_dir():
        return []
    return Checkpointer(directory, read_only=True).all_steps()


class Checkpointer:
    """The checkpoints of one run (`DIR/checkpoints`)."""

    def __init__(self, directory: str, keep: int = 2, keep_every: int = 0, async_save: bool = True,
                 read_only: bool = False, keep_steps: tuple[int, ...] = ()):
        policies = [pp.LatestN(keep)]
        if keep_every:
            policies.append(pp.EveryNSteps(keep_every))
        if keep_steps:
            policies.append(pp.CustomSteps(list(keep_steps)))
        self.manager = ocp.CheckpointManager(
            storage.absolute(directory),
            options=ocp.CheckpointManagerOptions(
                preservation_policy=pp.AnyPreservationPolicy(policies),
                enable_async_checkpointing=async_save, read_only=read_only, create=not read_only,
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, params, opt_state, meta: Meta) -> None:
        """Starts an async save; `wait()` (or the next save) finishes it. `opt_state=None` saves
        params and meta only (converted models; numpy arrays are written without a device copy)."""
        items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta.to_json(step))}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self.manager.save(step, args=ocp.args.Composite(**items))

    def meta(self, step: int | None = None) -> Meta:
        step = self.latest_step() if step is None else step
        stored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        return Meta.from_json(stored, f"{self.directory}/{step}")

    def restore(self, step: int, abstract_params, abstract_opt_state=None) -> tuple[dict, object, Meta]:
        """Restores onto the shardings carried by the abstract trees (jax.ShapeDtypeStruct with
        `sharding`); `abstract_opt_state=None` restores params and meta only. An optimizer state
        saved with one Adam count for all its moments (before update.scale_by_adam's per-row
        counts) comes back with that count in every row, which is what it meant."""
        meta = self.meta(step)
        items = {"params": ocp.args.StandardRestore(abstract_params)}
        one_count = abstract_opt_state is not None and _one_count(self._saved_opt_state(step))
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(
                _with_counts(abstract_opt_state, _one_of) if one_count else abstract_opt_state)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        opt_state = out.get("opt_state") if abstract_opt_state is not None else None
        if one_count:
            counts = _adam(abstract_opt_state).count
            spread = jax.jit(lambda c: jax.tree.map(lambda a: jnp.full(a.shape, c, a.dtype), counts),
                             out_shardings=jax.tree.map(lambda a: a.sharding, counts))
            opt_state = _with_counts(opt_state, spread)
        return out["params"], opt_state, meta

    def has_opt_state(self, step: int) -> bool:
        """Whether step `step` holds an optimizer state (a converted model holds params only)."""
        return (epath.Path(self.directory) / str(step) / "opt_state").is_dir()

    def _saved_opt_state(self, step: int):
        """The tree of step `step`'s optimizer state as saved (metadata: shapes, no values)."""
        with ocp.PyTreeCheckpointer() as reader:
            return reader.metadata(epath.Path(self.directory) / str(step) / "opt_state").item_metadata.tree

    def restore_moments(self, step: int, abstract_opt_state, opt_state) -> tuple[object, list[str]]:
        """`opt_state` (this run's, fresh) with the AdamW moments (mu, nu) of step `step` for each
        parameter whose path and shape match there, with their Adam counts (their bias correction
        belongs to them). Found by path, not by the state's layout, so the two runs may freeze
        different parameters. The moments that start at zero keep a count of 0, so that their bias
        correction starts afresh (update.scale_by_adam): those of parameters with no match there,
        and the rows (freeze.row_axis: vocabulary rows, layers) whose moments are all zero there,
        frozen there or never given a gradient. Returns (the state, the fresh moments, with why)."""
        saved = self._saved_opt_state(step)
        where = _find_adam(saved)
        if where is None:
            raise ValueError(f"checkpoint {self.directory}/{step} holds no AdamW moments")
        ours = [x for x in jax.tree.leaves(abstract_opt_state, is_leaf=_is_adam) if _is_adam(x)]
        if len(ours) != 1:
            raise ValueError(f"this run's optimizer state has {len(ours)} AdamW states, not one")
        theirs, one_count = _at(saved, where), _one_count(saved)
        wanted, fresh, matched = {}, [], {}
        for (keypath, x), count in zip(jax.tree_util.tree_leaves_with_path(ours[0].mu), jax.tree.leaves(ours[0].count)):
            path = tuple(str(k.key) for k in keypath)
            there = _at(theirs, ("mu", *path))
            if there is None or tuple(there.shape) != x.shape:
                why = f"{tuple(there.shape)} there" if there is not None else "none there"
                fresh.append(f"{'/'.join(path)} ({why}, {x.shape} here)")
                continue
            matched[path] = keypath, count
            wanted[("mu", *path)] = wanted[("nu", *path)] = x
            wanted[("count",) if one_count else ("count", *path)] = _one_of(count) if one_count else count
        request = _prune(saved, (), lambda p: wanted.get(p[len(where):]) if p[:len(where)] == where else None)
        restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), request)
        with ocp.PyTreeCheckpointer() as reader:
            out = _at(reader.restore(epath.Path(self.directory) / str(step) / "opt_state", args=ocp.args.PyTreeRestore(
                item=request, restore_args=restore_args, partial_restore=True)), where)

        @functools.partial(jax.jit, out_shardings={p: (c.sharding, c.sharding) for p, (_, c) in matched.items()})
        def live_counts(nu: dict, counts: dict) -> dict:
            """Per matched leaf: (its counts there, 0 in the rows whose moments are all zero; how many those are)."""
            def one(keypath, v, c):
                axis = freeze.row_axis(keypath)
                live = jnp.any(v != 0, axis=tuple(i for i in range(v.ndim) if i != axis), keepdims=axis is not None)
                return jnp.where(live, c, 0), live.size - live.sum()
            return {p: one(kp, nu[p], counts[p]) for p, (kp, _) in matched.items()}

        counted = live_counts({p: _at(out, ("nu", *p)) for p in matched},
                              {p: _at(out, ("count",) if one_count else ("count", *p)) for p in matched})
        for path, (count, dead) in counted.items():
            if int(dead):
                rows = ("layers" if path[0] == "layers" else "rows") if count.size > 1 else ""
                fresh.append(f"{'/'.join(path)} ({f'{int(dead)} of {count.size} {rows} with ' if rows else ''}"
                             f"zero moments there)")

        def moments(field: str, tree):
            def one(keypath, x):
                path = tuple(str(k.key) for k in keypath)
                if path not in matched:
                    return x
                return counted[path][0] if field == "count" else _at(out, (field, *path))
            return jax.tree_util.tree_map_with_path(one, tree)

        def swap(node):
            if not _is_adam(node):
                return node
            return node._replace(count=moments("count", node.count), mu=moments("mu", node.mu),
                                 nu=moments("nu", node.nu))
        return jax.tree.map(swap, opt_state, is_leaf=_is_adam), fresh

    def restore_latest(self, abstract_params, abstract_opt_state, check: Callable[[Meta, str], None]
                       ) -> tuple[int, dict, object] | None:
        """(step, params, opt_state) of the latest step that restores; None where none does.
        `check(meta, where)` raises ValueError where a readable checkpoint holds another model.

        Orbax renames a step into place only once it is complete, so a crash mid-save leaves no
        half step; a step that still fails to read (a truncated or corrupted file) is moved aside
        to `N.corrupt`, with a warning naming it and the step used instead."""
        steps = sorted(self.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            try:
                stored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception as e:  # noqa: BLE001  (any failure to read makes the step unusable)
                stored, error = None, e
            if stored is not None:  # readable: a checkpoint of another kind is an error, not corruption
                meta = Meta.from_json(stored, f"{self.directory}/{step}")
                check(meta, f"checkpoint {self.directory}/{step}")
                try:
                    params, opt_state, _ = self.restore(step, abstract_params, abstract_opt_state)
                    return step, params, opt_state
                except Exception as e:  # noqa: BLE001
                    error = e
            error = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
            fallback = f"{self.directory}/{steps[i + 1]}" if i + 1 < len(steps) else "no earlier checkpoint"
            log.warning("checkpoint %s/%d cannot be restored (%s); moved to %s/%d.corrupt; using %s instead",
                        self.directory, step, error, self.directory, step, fallback)
            self._move_aside(step)
        return None

    def _move_aside(self, step: int) -> None:
        if distributed.is_main():
            directory = epath.Path(self.directory)
            (directory / str(step)).rename(directory / f"{step}.corrupt")
        distributed.barrier(f"move_aside_{step}")
        self.manager.reload()

    @property
    def directory(self) -> str:
        return str(self.manager.directory)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _is_adam(x) -> bool:
    return isinstance(x, optax.ScaleByAdamState)


def _adam(opt_state) -> optax.ScaleByAdamState:
    return next(x for x in jax.tree.leaves(opt_state, is_leaf=_is_adam) if _is_adam(x))


def _with_counts(opt_state, f):
    """`opt_state` with the counts of its AdamW state replaced by f(counts)."""
    return jax.tree.map(lambda x: x._replace(count=f(x.count)) if _is_adam(x) else x, opt_state, is_leaf=_is_adam)


def _one_of(counts) -> jax.ShapeDtypeStruct:
    """One int32 count, placed as (the first of) `counts` are."""
    return jax.ShapeDtypeStruct((), jnp.int32, sharding=jax.tree.leaves(counts)[0].sharding)


def _one_count(saved) -> bool:
    """Whether a saved optimizer state (`_saved_opt_state`) has one Adam count for all its
    moments, as written before update.scale_by_adam's per-row counts."""
    where = _find_adam(saved)
    return where is not None and not isinstance(_at(saved, (*where, "count")), dict)


def _find_adam(tree, path: tuple = ()) -> tuple | None:
    """The path of the (first) AdamW state in a saved tree: a dict of count, mu and nu."""
    if isinstance(tree, dict) and {"count", "mu", "nu"} <= tree.keys():
        return path
    children = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for k, v in children:
        found = _find_adam(v, (*path, k))
        if found is not None:
            return found
    return None


def _at(tree, path: tuple):
    """The node at `path` of a nested dict/list tree; None where there is none."""
    for k in path:
        if isinstance(tree, dict) and k in tree:
            tree = tree[k]
        elif isinstance(tree, (list, tuple)) and isinstance(k, int) and k < len(tree):
            tree = tree[k]
        else:
            return None
    return tree


def _prune(tree, path: tuple, want):
    """The saved tree cut to the leaves `want(path)` names (as the ShapeDtypeStruct to restore
    them onto), for orbax's partial restore: dict keys dropped, list entries None."""
    if isinstance(tree, dict):
        kept = {k: _prune(v, (*path, k), want) for k, v in tree.items()}
        return {k: v for k, v in kept.items() if v is not None} or None
    if isinstance(tree, (list, tuple)):
        kept = [_prune(v, (*path, i), want) for i, v in enumerate(tree)]
        return kept if any(v is not None for v in kept) else None
    return want(path)
