"""cpt_jax.aot: runs compiled for TPU topologies on this CPU machine by libtpu (the `tpu` extra,
which .ci/run installs; nothing here runs on a TPU). Names and HLO reading are fast; each compile
takes 20-60 s on 2 cores, so those tests are in the slow tier. Compiles run in a subprocess with
JAX's persistent cache off: a program compiled for a topology cannot be read back from it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from cpt_jax import aot
from cpt_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "bible.py")
KEYS = {"topology", "chips", "slices", "mesh", "argument_bytes", "temp_bytes", "hbm_bytes", "fits", "compile_s",
        "collectives"}


def python(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python ARGS` with libtpu, no persistent compilation cache (conftest's environment otherwise)."""
    assert importlib.util.find_spec("libtpu"), "libtpu is missing: pip install -e '.[tpu]' (.ci/run installs it)"
    env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def compile_json(*flags: str) -> tuple[int, dict | None, str]:
    r = python("-m", "cpt_jax.aot", "--config", f"{CONFIG}:test", "--json", *flags)
    return r.returncode, json.loads(r.stdout) if r.stdout.strip() else None, r.stderr


def test_topology_names():
    t = aot.parse_topology("v5p:4x4x4")
    assert (t.generation, t.chips, t.hbm_bytes, t.accelerator_type) == ("v5p", 64, 95 << 30, "v5p-128")
    # gcloud's accelerator types: v4 and v5p count TensorCores (2 per chip), v5e and v6e chips
    assert aot.parse_topology("v5p-128").name == "v5p:4x4x4"
    assert aot.parse_topology("v5p-32").name == "v5p:2x2x4"
    assert aot.parse_topology("v5p-8").name == "v5p:2x2x1"
    assert aot.parse_topology("v4-16").name == "v4:2x2x2"
    assert aot.parse_topology("v5litepod-8").name == "v5e:2x4"
    assert aot.parse_topology("v6e-256").name == "v6e:16x16"
    assert aot.parse_topology("v5e:2x4").accelerator_type == "v5litepod-8"
    for bad, says in [("v7x:2x2", "is not a TPU topology"), ("tpu", "is not a TPU topology"),
                      ("v5p:2x2", "3 axes"), ("v5p-384", "give the slice's shape")]:
        with pytest.raises(ConfigError, match=f"--topology='{bad}'.*{says}"):
            aot.parse_topology(bad)


def test_collectives_are_counted_as_written():
    hlo = textwrap.dedent("""\
        %all-reduce-scatter.3 (input.3: f32[64,8]) -> f32[32,8] {
          %all-reduce.63 = f32[64,8]{1,0} all-reduce(%input.3), channel_id=75, to_apply=%add
          ROOT %dynamic-slice.215 = f32[32,8]{1,0} dynamic-slice(%all-reduce.63, %m, %c)
        }
        %body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
          %all-gather-start.1 = (f32[4], f32[8]) all-gather-start(%x), dimensions={0}
          %all-gather-done.1 = f32[8]{0} all-gather-done(%all-gather-start.1)
        }
        ENTRY %main (a: f32[64,8]) -> f32[32,8] {
          %fusion.17 = f32[32,8]{1,0} fusion(%a), kind=kCustom, calls=%all-reduce-scatter.3
          %all-reduce.1 = f32[] all-reduce(%s), to_apply=%add
          %while.1 = (s32[], f32[8]) while(%t), condition=%cond, body=%body
        }
        """)
    assert aot.count_collectives(hlo) == {"all-gather": 1, "reduce-scatter": 1, "all-reduce": 1, "all-to-all": 0,
                                          "collective-permute": 0}


@pytest.mark.slow
def test_fsdp_and_data_parallel_meshes_compile_with_their_collectives():
    # FSDP over a v5e slice: parameters gathered for use, gradients reduce-scattered to their shards.
    rc, fsdp, err = compile_json("--topology", "v5e:2x2", "--config.mesh.shape=(1,-1,1)",
                                 "--config.data.packing=documents")
    assert rc == 0, err
    assert KEYS <= set(fsdp)
    assert (fsdp["topology"], fsdp["chips"], fsdp["slices"], fsdp["hbm_bytes"]) == ("v5e:2x2", 4, 1, 16 << 30)
    assert fsdp["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1, "context": 1} and fsdp["fits"]
    assert fsdp["model"]["attention"] == "splash" and fsdp["model"]["dtype"] == "bfloat16"  # TPU's, not this CPU's
    assert fsdp["collectives"]["all-gather"] > 0 and fsdp["collectives"]["reduce-scatter"] > 0
    assert 0 < fsdp["argument_bytes"] < fsdp["hbm_bytes"] and fsdp["temp_bytes"] > 0 and fsdp["compile_s"] > 0
    # Data parallel over a v5p slice: replicated parameters, gradients all-reduced, nothing gathered.
    rc, dp, err = compile_json("--topology", "v5p:2x2x1", "--config.mesh.shape=(-1,1,1)")
    assert rc == 0, err
    assert dp["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1, "context": 1} and dp["hbm_bytes"] == 95 << 30
    assert dp["collectives"]["all-reduce"] > 0
    assert dp["collectives"]["all-gather"] == dp["collectives"]["reduce-scatter"] == 0
    assert dp["argument_bytes"] > 3 * fsdp["argument_bytes"]  # the whole state on every chip, not a quarter


@pytest.mark.slow
def test_two_slices_put_the_data_axis_across_them():
    r = python("-c", textwrap.dedent("""\
        from cpt_jax import aot, sharding
        devices = aot.topology_devices(aot.parse_topology("v5p:2x2x1"), num_slices=2)
        mesh = sharding.make_mesh((2, 2, 2), devices)
        print([sorted({d.slice_index for d in mesh.devices[i].flat}) for i in range(2)])
        """))
    assert r.returncode == 0 and r.stdout.split("\n")[-2] == "[[0], [1]]", r.stderr  # each data index one slice
    rc, out, err = compile_json("--topology", "v5p:2x2x1", "--num_slices", "2", "--config.mesh.shape=(2,-1,1)")
    assert rc == 0, err
    assert (out["chips"], out["slices"], out["mesh"]) == (4, 2, {"data": 2, "fsdp": 4, "tensor": 1, "context": 1})
    assert out["collectives"]["all-reduce"] > 0  # the gradients' sum over the data axis, across the slices
    rc, out, err = compile_json("--topology", "v5p:2x2x1", "--num_slices", "2", "--config.mesh.shape=(1,-1,1)")
    assert rc == 2 and out is None
    assert err.strip().splitlines() == [
        "config error: mesh.shape=(1, 8, 1): the data axis crosses the 2 slices, so it must be a multiple of 2, "
        "e.g. (2, -1, 1)"]


@pytest.mark.slow
def test_bad_topology_or_mesh_exits_2_with_one_line():
    for flags, says in [(["--topology", "v7x:2x2"], "config error: --topology='v7x:2x2' is not a TPU topology"),
                        (["--topology", "v5e:2x2", "--config.mesh.shape=(2,4,1)"],
                         "config error: mesh.shape=(2, 4, 1) does not divide the 4 available devices")]:
        rc, out, err = compile_json(*flags)
        assert rc == 2 and out is None and len(err.strip().splitlines()) == 1 and err.startswith(says), err


@pytest.mark.slow
def test_a_run_too_large_for_its_slice_exits_2_naming_its_largest_arrays():
    # A 6M-entry vocabulary: 768M parameters, their AdamW state and the logits on one 16 GiB chip.
    r = python("-m", "cpt_jax.aot", "--config", f"{CONFIG}:test", "--topology", "v5e:1x1",
               "--config.model.vocab_size=6000000", "--config.batch_size=4")
    assert r.returncode == 2, r.stderr
    assert "DOES NOT FIT" in r.stdout and "of 16.00 GiB HBM" in r.stdout  # the report, then why
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("config error: the run needs ") and "more than the 16 GiB of v5e:1x1" in line
    assert "f32[4,128,6000000]" in line and "state.params['lm_head']" in line  # the logits, the head's shard


@pytest.mark.slow
def test_splash_attention_is_compiled_by_mosaic_at_long_lengths_with_documents_and_windows():
    # Forward and backward (dq, dkv): three Mosaic kernels per program; in interpret mode there would be none.
    r = python("-c", textwrap.dedent("""\
        import jax, jax.numpy as jnp
        from cpt_jax import aot, sharding
        from cpt_jax.models import attention
        mesh = sharding.make_mesh((2, 1, 2), aot.topology_devices(aot.parse_topology("v5e:2x2")))
        for t, window, documents in [(2048, 0, False), (2048, 0, True), (8192, 1024, True), (32768, 4096, True)]:
            q, kv = (jax.ShapeDtypeStruct((2, t, heads, 128), jnp.bfloat16) for heads in (4, 2))
            segments = jax.ShapeDtypeStruct((2, t), jnp.int32) if documents else None
            loss = lambda q, k, v, s: attention.causal_attention(q, k, v, "splash", s, window=window).sum()
            with jax.set_mesh(mesh):
                program = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, segments).compile()
            mosaic = program.as_text().count('custom_call_target="tpu_custom_call"')
            print(t, window, documents, mosaic, program.memory_analysis().temp_size_in_bytes)
        """))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split() for line in r.stdout.strip().splitlines()]
    assert [row[:4] for row in rows] == [["2048", "0", "False", "3"], ["2048", "0", "True", "3"],
                                         ["8192", "1024", "True", "3"], ["32768", "4096", "True", "3"]]
    assert all(int(row[4]) < 2**30 for row in rows)  # no [t, t] mask or logits in memory: 32768^2 floats are 4 GiB
