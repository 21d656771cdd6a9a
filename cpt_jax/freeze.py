"""`optimizer.freeze`: the parameters, or slices of them, that a run does not train.

A pattern names paths of the parameter tree, one fnmatch glob per `/`-separated component,
matching a leaf and everything under it:

    embed  lm_head  final_norm     those leaves
    layers                         every per-layer parameter
    layers/q  layers/*norm         those of every layer
    layers/0  layers/0-3           layers 0 (0 to 3, inclusive) of every layers/* parameter:
    layers/0-3/q                   a slice of the stacked leading `layers` axis
    old_vocab                      the embedding (and output head) rows of the vocabulary the
                                   model had before extend-vocab: with "layers" and
                                   "final_norm", only the rows extend-vocab added train

`resolve` turns the patterns into a `Mask` once, from the abstract parameters, before anything is
compiled: the train step closes over it as a constant, so it stays a pure function and a frozen
slice is decided at compile time, not per step.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cpt_jax.errors import ConfigError

OLD_VOCAB = "old_vocab"
FIELD = "optimizer.freeze"
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
# The leaves that hold vocabulary rows, and the axis the rows are along.
_VOCAB_AXIS = {("embed",): 0, ("lm_head",): 1}


@dataclasses.dataclass(frozen=True)
class Rows:
    """A leaf trained in part: the index ranges [start, stop) along `axis` keep their values.
    Ranges, not a boolean per row, so that a mask over a 150k-row embedding stays small."""

    axis: int
    size: int
    frozen: tuple[tuple[int, int], ...]

    def trainable(self, ndim: int) -> np.ndarray:
        """A boolean array broadcastable against the leaf: True where it trains."""
        keep = np.ones(self.size, bool)
        for start, stop in self.frozen:
            keep[start:stop] = False
        shape = [1] * ndim
        shape[self.axis] = self.size
        return keep.reshape(shape)

    def count(self) -> int:
        return sum(stop - start for start, stop in self.frozen)


# A tree like the params whose leaves are True (trained), False (frozen whole) or Rows.
Mask = Any


@dataclasses.dataclass(frozen=True)
class Pattern:
    text: str
    names: tuple[str, ...]  # fnmatch globs, one per path component
    layers: tuple[int, int] | None = None  # inclusive layer range, for a layers/N-M pattern


def parse(text: str) -> Pattern:
    """A pattern's parts; a ConfigError naming it where it cannot be one. Needs no model, so
    validate() finds a typo before anything is loaded."""
    if not isinstance(text, str) or not text.strip("/"):
        raise ConfigError(f"{FIELD}: {text!r} is not a parameter path (e.g. 'embed', 'layers/0-3', '{OLD_VOCAB}')")
    if text == OLD_VOCAB:
        return Pattern(text, ())
    parts = text.split("/")
    if any(not p for p in parts):
        raise ConfigError(f"{FIELD}: {text!r} has an empty path component")
    layers = None
    if len(parts) > 1 and _RANGE.match(parts[1]):
        if parts[0] != "layers":
            raise ConfigError(f"{FIELD}: {text!r}: a layer index (N or N-M) comes right after 'layers/'")
        m = _RANGE.match(parts[1])
        layers = (int(m[1]), int(m[2] if m[2] is not None else m[1]))
        if layers[0] > layers[1]:
            raise ConfigError(f"{FIELD}: {text!r}: the layer range {parts[1]} is empty (write low-high)")
        parts = [parts[0], *parts[2:]]
    if any(_RANGE.match(p) for p in parts):
        raise ConfigError(f"{FIELD}: {text!r}: a layer index (N or N-M) comes right after 'layers/'")
    return Pattern(text, tuple(parts), layers)


def _path(keypath) -> tuple[str, ...]:
    return tuple(str(k.key) for k in keypath)


def row_axis(keypath) -> int | None:
    """The axis along which the leaf at `keypath` can be frozen in part (and so have some of its
    moments fresh): the vocabulary rows of the embedding and head, the stacked layers of a
    per-layer leaf; None for any other leaf, frozen only whole."""
    path = _path(keypath)
    return _VOCAB_AXIS.get(path, 0 if path[0] == "layers" else None)


def resolve(patterns, abstract_params: dict, old_vocab: int | None = None, where: str = "the model") -> Mask | None:
    """The Mask of `patterns` over `abstract_params` (anything with .shape); None where nothing
    is frozen, so that such a run's optimizer is exactly the unfrozen one. `old_vocab`: rows the
    model had before extend-vocab (None: it was not extended; `where` names it in the error)."""
    parsed = [parse(p) for p in patterns]
    if not parsed:
        return None
    leaves = {_path(kp): leaf.shape for kp, leaf in jax.tree_util.tree_leaves_with_path(abstract_params)}
    n_layers = next((shape[0] for path, shape in leaves.items() if path[0] == "layers"), 0)
    whole: set[tuple[str, ...]] = set()
    rows: dict[tuple[str, ...], list[tuple[int, int]]] = {}
    for p in parsed:
        if p.text == OLD_VOCAB:
            if old_vocab is None:
                raise ConfigError(f"{FIELD}: {OLD_VOCAB!r} is the vocabulary before extend-vocab, but {where} was not "
                                  f"made by `python -m cpt_jax.convert extend-vocab`")
            for path, axis in _VOCAB_AXIS.items():
                if path in leaves:
                    rows.setdefault(path, []).append((0, min(old_vocab, leaves[path][axis])))
            continue
        hits = [path for path in leaves if len(p.names) <= len(path)
                and all(fnmatch.fnmatchcase(k, n) for k, n in zip(path, p.names))]
        if not hits:
            names = ", ".join("/".join(path) for path in leaves)
            raise ConfigError(f"{FIELD}: {p.text!r} matches no parameter (they are: {names})")
        if p.layers is None:
            whole.update(hits)
            continue
        if p.layers[1] >= n_layers:
            raise ConfigError(f"{FIELD}: {p.text!r}: layer {p.layers[1]} is out of range (the model has {n_layers} "
                              f"layers, 0-{n_layers - 1})")
        for path in hits:
            rows.setdefault(path, []).append((p.layers[0], p.layers[1] + 1))

    def leaf(keypath, x):
        path = _path(keypath)
        if path in whole:
            return False
        if path not in rows:
            return True
        axis = row_axis(keypath)
        r = Rows(axis, x.shape[axis], _merge(rows[path]))
        return False if r.count() == r.size else r
    mask = jax.tree_util.tree_map_with_path(leaf, abstract_params)
    if not any(m is not False for m in jax.tree.leaves(mask)):
        raise ConfigError(f"{FIELD}={tuple(patterns)!r} freezes every parameter: nothing would train")
    return mask


def _merge(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for start, stop in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], stop)
        else:
            out.append([start, stop])
    return tuple((a, b) for a, b in out if b > a)


def frozen_count(mask: Mask, abstract_params: dict) -> int:
    """How many parameter values `mask` freezes."""
    def n(m, x):
        per = int(np.prod(x.shape))
        return per if m is False else 0 if m is True else per // m.size * m.count()
    return sum(jax.tree.leaves(jax.tree.map(n, mask, abstract_params)))


def zero_frozen(tree, mask: Mask):
    """`tree` (gradients or updates, like the params) with its frozen entries 0. Wholly frozen
    leaves become constant zeros, so XLA drops the backward pass that would compute them."""
    if mask is None:
        return tree

    def one(m, x):
        if m is True or isinstance(x, optax.MaskedNode):
            return x
        if m is False:
            return jnp.zeros_like(x)
        return jnp.where(m.trainable(x.ndim), x, jnp.zeros((), x.dtype))
    return jax.tree.map(one, mask, tree)  # the mask first: its leaves may stand where `tree` has a MaskedNode


def masked_updates(mask: Mask) -> optax.GradientTransformation:
    """Zeroes the frozen entries of the updates. Last in the chain: AdamW's decoupled weight
    decay (and momentum) would move a frozen value even where its gradient is 0."""
    return optax.stateless(lambda updates, params=None: zero_frozen(updates, mask))


def labels(mask: Mask):
    """multi_transform labels: wholly frozen leaves get no optimizer state at all."""
    return jax.tree.map(lambda m: "frozen" if m is False else "train", mask)


def apply_updates(params: dict, updates, mask: Mask) -> dict:
    """params + updates, with frozen entries the old values themselves: bit-identical even
    where a value is -0.0 (which -0.0 + 0.0 would turn into +0.0)."""
    if mask is None:
        return optax.apply_updates(params, updates)

    def one(m, p, u):
        if m is False:
            return p
        new = (p + u).astype(p.dtype)
        return new if m is True else jnp.where(m.trainable(p.ndim), new, p)
    return jax.tree.map(one, mask, params, updates)


def state_shardings(abstract_opt, abstract_params: dict, param_shardings: dict, other):
    """Optimizer-state shardings: a leaf whose key path ends in a parameter's path and has its
    shape (a moment) is sharded as that parameter; anything else (counts) gets `other`."""
    by_path = {_path(kp): (x.shape, s) for (kp, x), s in
               zip(jax.tree_util.tree_leaves_with_path(abstract_params), jax.tree.leaves(param_shardings))}

    def one(keypath, x):
        tail = []
        for k in reversed(keypath):  # the trailing dict keys: a parameter's path
            if not isinstance(k, jax.tree_util.DictKey):
                break
            tail.insert(0, str(k.key))
        shape, s = by_path.get(tuple(tail), (None, other))
        return s if shape == x.shape else other
    return jax.tree_util.tree_map_with_path(one, abstract_opt)
