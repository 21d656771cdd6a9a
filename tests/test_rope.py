"""RoPE extension: each rope_type computes what transformers' own implementation does at positions
past the original context, an imported scaling exports back unchanged, a type cpt_jax does not
compute is refused naming the field, and a stage at a longer seq_len changes only the RoPE of the
checkpoint it continues, then resumes exactly like any other run."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from cpt_jax import checks, inference, models, positions, summary, trainer
from cpt_jax.convert import hf, save_model
from cpt_jax.errors import ConfigError
from cpt_jax.models import rope
from cpt_jax.rundir import RunDir

from helpers import comparable, setup, small_config

HEAD_DIM, ORIGINAL = 16, 32
_rng = np.random.default_rng(0)
# rope_type -> (transformers' rope_parameters beside rope_theta 500, max_position_embeddings). The
# original context is 32 where a type has one (dynamic reads it from max_position_embeddings).
CASES = {
    "raised-theta": ({"rope_type": "default", "rope_theta": 5e5}, 512),
    "linear": ({"rope_type": "linear", "factor": 4.0}, 512),
    "dynamic": ({"rope_type": "dynamic", "factor": 4.0}, ORIGINAL),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}, 128),
    "yarn-options": ({"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": ORIGINAL,
                      "beta_fast": 8, "beta_slow": 2, "truncate": False, "attention_factor": 0.9}, 96),
    "yarn-mscale": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL, "mscale": 1.0,
                     "mscale_all_dim": 0.5}, 128),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": ORIGINAL}, 256),
    "longrope": ({"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                  "short_factor": [float(x) for x in 1 + _rng.random(HEAD_DIM // 2)],
                  "long_factor": [float(x) for x in 1 + 4 * _rng.random(HEAD_DIM // 2)]}, 128),
}


def hf_config(parameters: dict, max_positions: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=16, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=64 // HEAD_DIM,
        num_key_value_heads=2, max_position_embeddings=max_positions, architectures=["LlamaForCausalLM"],
        rope_parameters={"rope_theta": 500.0, **parameters})


def hf_tables(config: transformers.LlamaConfig, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """transformers' cos and sin (its attention scaling included) of a fresh rotary embedding (a
    dynamic one keeps the longest length it has seen), first half: the other repeats it."""
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1), torch.tensor(positions))
    return cos.numpy()[..., :HEAD_DIM // 2], sin.numpy()[..., :HEAD_DIM // 2]


@pytest.mark.parametrize("case", list(CASES))
def test_each_rope_type_matches_transformers_past_the_original_context(case):
    config = hf_config(*CASES[case])
    cfg = hf.config_from_hf(json.loads(config.to_json_string()), "config.json")
    tables = jax.jit(rope.rope_tables, static_argnums=(1, 2, 3))  # one program for every length
    for length in (20, 4 * ORIGINAL):  # within the original context, then 4x past it
        positions = np.stack([np.arange(length), np.arange(length)[::-1]])
        got = tables(jnp.asarray(positions), cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        for ours, theirs in zip(got, hf_tables(config, positions)):
            np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5, rtol=0)
    # Each extension moves the tables away from the unscaled ones there: the comparison sees it.
    plain = rope.rope_tables(jnp.asarray(positions), cfg.head_dim, 500.0)
    assert np.abs(np.asarray(got[0]) - np.asarray(plain[0])).max() > 1e-2


@pytest.mark.parametrize("case", list(CASES))
def test_an_imported_rope_scaling_exports_back_unchanged(case):
    config = hf_config(*CASES[case])
    saved = json.loads(config.to_json_string())
    cfg = hf.config_from_hf(saved, "config.json")
    for base in (saved, None):  # over the imported config.json, and a new one
        exported = json.loads(json.dumps(hf.config_to_hf(cfg, base)))
        assert transformers.LlamaConfig(**exported).rope_parameters == config.rope_parameters
    # Through checkpoint metadata (JSON: longrope's factors come back as lists) the config is the same.
    assert models.ModelConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


def test_what_transformers_reads_from_max_position_embeddings_is_made_explicit():
    """A v4 config's `type`, a yarn factor or original length left to max_position_embeddings
    (transformers' standardisation), a top-level original length (Phi-3's: it wins when
    transformers computes), dynamic's threshold: each imported into the scaling, computing the same."""
    c = json.loads(hf_config({}, 64).to_json_string())
    del c["rope_parameters"]
    cases = [({"type": "yarn", "factor": 4.0}, {}, {"original_max_position_embeddings": 64}),
             ({"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 16}, {}, {"factor": 4.0}),
             ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
              {"original_max_position_embeddings": 16}, {"original_max_position_embeddings": 16}),
             ({"rope_type": "dynamic", "factor": 2.0}, {}, {"original_max_position_embeddings": 64})]
    positions = np.arange(128)[None]
    for scaling, top, want in cases:
        got = dict(hf.config_from_hf({**c, **top, "rope_theta": 500.0, "rope_scaling": scaling}, "c").rope_scaling)
        assert {k: got[k] for k in want} == want and "type" not in got, scaling
        theirs = transformers.LlamaConfig(**c, **top, rope_theta=500.0, rope_scaling=dict(scaling))
        ours = rope.rope_tables(jnp.asarray(positions), HEAD_DIM, 500.0, tuple(got.items()))
        np.testing.assert_allclose(np.asarray(ours[0]), hf_tables(theirs, positions)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("scaling", "message"), [
    ({"rope_type": "proportional", "factor": 2.0}, "rope_type 'proportional' is not one of default, linear, dynamic"),
    ({"rope_type": "yarn", "factor": 4.0}, "rope_type 'yarn' needs original_max_position_embeddings"),
    ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5},
     "partial_rotary_factor is not a key of rope_type 'linear'"),
    ({"rope_type": "default", "factor": 2.0}, r"factor is not a key of rope_type 'default' \(its keys: none\)"),
    ({"rope_type": "linear", "factor": "2"}, "factor='2' must be a number > 0"),
    ({"rope_type": "longrope", "factor": 2.0, "original_max_position_embeddings": 8, "short_factor": [1.0],
      "long_factor": [1.0]}, r"short_factor has 1 values, not one per frequency \(head_dim // 2 = 8\)"),
])
def test_a_rope_type_cpt_jax_does_not_compute_is_refused_naming_the_field(scaling, message):
    with pytest.raises(ValueError, match=f"model rope_scaling=.*: {message}"):
        models.model_config("test", 64, head_dim=16, rope_scaling=tuple(scaling.items()))


@pytest.mark.parametrize("size", ["test", "init_from"])
def test_a_runs_rope_parameters_are_checked_before_anything_is_built(size):
    config = small_config(f"--config.model.size={size}", "--config.init_from=/not/needed/by/check_config")
    config.model.rope_parameters = {"rope_type": "proportional", "factor": 2.0}
    with pytest.raises(ConfigError, match=r"model.rope_parameters=.*: rope_type 'proportional' is not one of"):
        checks.check_config(config)


def test_rope_parameters_change_only_the_rope_they_name():
    scaling = (("factor", 2.0), ("rope_type", "linear"))
    assert rope.override(1e4, scaling, {}, 16) == (1e4, scaling)
    assert rope.override(1e4, scaling, {"rope_theta": 5e5}, 16) == (5e5, scaling)  # Llama 2 Long's raised base
    assert rope.override(1e4, scaling, {"rope_type": "default"}, 16) == (1e4, ())
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    assert rope.override(1e4, scaling, yarn, 16) == (1e4, tuple(sorted(yarn.items())))
    with pytest.raises(ValueError, match=r"model.rope_parameters=.*: factor without a rope_type"):
        rope.override(1e4, scaling, {"factor": 8.0}, 16)
    with pytest.raises(ValueError, match=r"rope_theta=0 must be a number > 0"):
        rope.override(1e4, scaling, {"rope_theta": 0}, 16)


# ---------------------------------------------------------------- a stage at a longer seq_len

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


def continuation(init_from: str, parameters: dict, *more):
    """4x the small run's 32 positions, 512 tokens per step (4 x 128, as a source at 16 x 32),
    over `init_from`'s architecture with its RoPE changed by `parameters`."""
    config = small_config(f"--config.init_from={init_from}", "--config.model.size=init_from", "--config.seq_len=128",
                          "--config.batch_size=4", *more)
    config.model.rope_parameters = parameters
    return config


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A converted model of the small run's architecture and tokenizer, its RoPE theta 5000 with a
    linear scaling: what a stage starts from, without training one."""
    plan = setup(small_config(), str(tmp_path_factory.mktemp("probe") / "run"))
    cfg = dataclasses.replace(plan.model, rope_theta=5000.0, rope_scaling=(("factor", 2.0), ("rope_type", "linear")))
    path = tmp_path_factory.mktemp("converted") / "model"
    save_model(path, cfg, models.init_params(cfg, jax.random.key(0)), plan.data.tokenizer)
    return str(path)


def test_a_stage_takes_the_checkpoints_architecture_with_only_its_rope_changed(converted, tmp_path):
    theirs = RunDir.of(converted).meta().model
    for parameters, theta, scaling in [
            ({}, 5000.0, (("factor", 2.0), ("rope_type", "linear"))),  # the checkpoint's own
            ({"rope_theta": 4e5}, 4e5, (("factor", 2.0), ("rope_type", "linear"))),  # Llama 2 Long's raised base
            (YARN, 5000.0, tuple(sorted(YARN.items())))]:
        run = setup(continuation(converted, parameters), str(tmp_path / str(len(parameters))))
        assert (run.model.rope_theta, run.model.rope_scaling) == (theta, scaling), parameters
        assert run.model.architecture() == models.ModelConfig.architecture_of(theirs)
        assert run.meta.model["rope_scaling"] == scaling  # what its checkpoints, resumes and exports read
    # A branch continues its run's data stream, so it keeps its seq_len: a longer one is an init_from stage.
    os.makedirs(tmp_path / "parent")
    (tmp_path / "parent" / "config.json").write_text(small_config("--config.total_steps=4").to_json())
    branch = small_config("--config.total_steps=4", f"--config.branch_from={tmp_path / 'parent'}",
                          "--config.branch_step=2", "--config.seq_len=128")
    with pytest.raises(ConfigError, match=r"was trained with another config \(seq_len: 32 -> 128\)"):
        checks.check_branch(branch)


@pytest.mark.slow  # a run at seq_len 32, a stage at 128 from it, that stage resumed: 25 s (8 s compiled before)
def test_a_longer_seq_len_stage_trains_and_resumes_exactly(tmp_path):
    short = str(tmp_path / "short")
    trainer.train_run(small_config("--config.total_steps=3", "--config.batch_size=16", "--config.checkpoint_every=3"),
                      short)
    config = continuation(short, YARN, "--config.total_steps=4", "--config.checkpoint_every=2",
                          "--config.keep_checkpoints=3", "--config.eval_every=2", "--config.log_every=1",
                          "--config.eval_position_bucket=32")
    whole = trainer.train_run(config, str(tmp_path / "whole"))
    evals = [r for r in whole if "eval/zh/loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]  # held-out losses, each also by position
    assert all(positions.curve(r, "zh")[0].tolist() == [0, 32, 64, 96] for r in evals)
    table = summary.positions(str(tmp_path), ["short", "whole"])  # the short run logged none
    assert "\nwhole (en, step 0 -> 4):" in table and "\nshort (" not in table
    assert os.path.getsize(tmp_path / "positions.png") > 10_000
    meta = RunDir.of(str(tmp_path / "whole")).meta()
    assert dict(meta.model["rope_scaling"]) == YARN and meta.config["seq_len"] == 128
    start = models.params_of(inference.load(short)[0])
    end = models.params_of(inference.load(str(tmp_path / "whole"))[0])
    assert all(np.isfinite(r["train/loss"]) for r in whole if "train/loss" in r)
    assert not np.array_equal(start["layers"]["q"], end["layers"]["q"])  # it trained
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "4")  # as if it had stopped after saving step 2
    resumed = trainer.train_run(config, str(tmp_path / "cut"))
    assert comparable(resumed) == comparable(whole)
    cut = models.params_of(inference.load(str(tmp_path / "cut"))[0])
    jax.tree.map(np.testing.assert_array_equal, cut, end)
