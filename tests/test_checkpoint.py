"""Orbax checkpoints: what is kept, what is stored with them, and restoring onto other meshes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax import checkpoint, models, sharding
from cpt_jax.models import model_config

CFG = model_config("test", 64)


def _sharded_params(mesh):
    spec = models.spec(CFG)
    shardings = sharding.param_shardings(spec.abstract_params, spec.axes, mesh)
    init = jax.jit(lambda k: models.init_params(CFG, k), out_shardings=shardings)
    return init(jax.random.key(0)), spec, shardings


def _abstract(spec, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        spec.abstract_params, shardings)


def test_keeps_last_n_plus_every_kth(tmp_path):
    mesh = sharding.make_mesh((8, 1, 1))
    params, _, _ = _sharded_params(mesh)
    opt_state = {"count": jnp.zeros((), jnp.int32)}
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2, keep_every=30)
    for step in range(10, 110, 10):
        ckpt.save(step, params, opt_state, checkpoint.Meta(model={}, config={"seed": step}))
    ckpt.wait()
    assert ckpt.all_steps() == [30, 60, 90, 100]
    meta = ckpt.meta()
    assert meta.step == 100 and meta.layout == checkpoint.LAYOUT and meta.config == {"seed": 100}
    assert meta.version == checkpoint.META_VERSION
    ckpt.close()


def test_restore_onto_another_mesh_keeps_values(tmp_path):
    """Saved fully sharded on 8 devices, restored tensor-parallel on another mesh: a resumed or
    CPT run need not use the topology the checkpoint was written on."""
    saved, _, _ = _sharded_params(sharding.make_mesh((1, 8, 1)))
    ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(5, saved, {"count": jnp.zeros((), jnp.int32)}, checkpoint.Meta(model={}))
    ckpt.wait()

    mesh = sharding.make_mesh((1, 4, 2))
    _, spec, shardings = _sharded_params(mesh)
    params, opt_state, meta = checkpoint.Checkpointer(str(tmp_path), read_only=True).restore(
        5, _abstract(spec, shardings))
    assert opt_state is None and meta.step == 5  # params only: what init_from takes
    jax.tree.map_with_path(lambda path, got, want: np.testing.assert_array_equal(
        np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path)), params, saved)
    assert jax.tree.map(lambda x: x.sharding, params) == shardings
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(shardings))


def test_other_layout_is_refused_by_name(tmp_path):
    mesh = sharding.make_mesh((8, 1, 1))
    params, spec, shardings = _sharded_params(mesh)
    ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
    ckpt.manager.save(1, args=checkpoint.ocp.args.Composite(
        params=checkpoint.ocp.args.StandardSave(params),
        opt_state=checkpoint.ocp.args.StandardSave({"count": jnp.zeros((), jnp.int32)}),
        meta=checkpoint.ocp.args.JsonSave({"step": 1, "layout": "per-layer-v0"}),
    ))
    ckpt.wait()
    with pytest.raises(ValueError, match="per-layer-v0"):
        ckpt.restore(1, _abstract(spec, shardings))


def test_restore_latest_refuses_another_model_and_moves_nothing(tmp_path):
    """A checkpoint that reads fine but holds another architecture is an error, not corruption:
    nothing is moved aside."""
    mesh = sharding.make_mesh((8, 1, 1))
    params, spec, shardings = _sharded_params(mesh)
    ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(3, params, {"count": jnp.zeros((), jnp.int32)}, checkpoint.Meta(model=dataclasses.asdict(CFG)))
    ckpt.wait()
    abstract_opt = {"count": jax.ShapeDtypeStruct((), jnp.int32, sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))}
    check = lambda cfg: lambda meta, where: cfg.check_restores(meta.model, where)  # noqa: E731
    step, restored, _ = ckpt.restore_latest(_abstract(spec, shardings), abstract_opt, check(CFG))
    assert step == 3
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, params)
    with pytest.raises(ValueError, match="holds another model"):
        wider = dataclasses.replace(CFG, hidden=2 * CFG.hidden)
        ckpt.restore_latest(_abstract(spec, shardings), abstract_opt, check(wider))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3"]


def test_meta_of_an_older_checkpoint_reads_with_defaults_and_a_newer_one_is_refused(tmp_path):
    """Metadata written before `version` and newer fields existed reads as version 0 with their
    defaults; a version this cpt_jax does not know is one clear error."""
    old = {"model": {"hidden": 8}, "tokenizer": "ab", "step": 4, "layout": checkpoint.LAYOUT}
    meta = checkpoint.Meta.from_json(old, "old/4")
    assert (meta.version, meta.sources, meta.vocab_extension, meta.step) == (0, (), None, 4)
    newer = checkpoint.META_VERSION + 1
    with pytest.raises(ValueError, match=f"new/4 has metadata version {newer}; this cpt_jax reads up to "):
        checkpoint.Meta.from_json({**old, "version": newer}, "new/4")
    with pytest.raises(ValueError, match="has layout 'per-layer'"):
        checkpoint.Meta.from_json({**old, "layout": "per-layer"}, "x/4")
