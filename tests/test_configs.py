"""The configs that continue a bundled pretrained model (configs/cpt_smollm2_zh.py,
configs/cpt_gemma3_zh.py): each mode passes the run's config checks, and the train step of the
real architecture (read from the bundled GGUF's metadata, as the converted model's would be)
compiles with the config's optimizer, numerics and sources at a small shape over 8 CPU devices."""

import dataclasses
import os

import jax
import pytest

from cpt_jax import checks, convert, update
from cpt_jax.config import load_file
from cpt_jax.convert import hf
from cpt_jax.convert.gguf import GGUFFile
from cpt_jax.data import pipeline

from helpers import ROOT


@pytest.mark.slow  # 15-25 s each on 2 cores: the real models' train steps compile
@pytest.mark.parametrize(("name", "bundled", "arch"), [
    ("cpt_smollm2_zh.py", "smollm2", "LlamaForCausalLM"),
    ("cpt_gemma3_zh.py", "gemma3-270m", "Gemma3ForCausalLM"),
])
def test_bundled_model_config_checks_and_compiles(name, bundled, arch):
    path = os.path.join(ROOT, "configs", name)
    checks.check_config(load_file(f"{path}:gpu"))  # on 8 devices
    checks.check_config(load_file(f"{path}:cpu"), jax.devices()[:1])  # a CPU, as JAX sees one by default
    config = load_file(path)
    assert (config.init_from, config.model.size) == (bundled, "init_from")
    gguf = convert.resolve_source(bundled)
    hf_config = GGUFFile(gguf).hf_config()
    assert hf_config["architectures"] == [arch]
    source = dataclasses.asdict(hf.config_from_hf(hf_config, gguf))
    config.batch_size, config.seq_len = 8, 64
    mesh = checks.check_config(config)
    mcfg = checks.model_config(config, source["vocab_size"], source, seq_len=config.seq_len)
    used = [s for s in config.data.sources  # the sources the mixture reads, as the trainer counts them
            if any(w[s] > 0 for _, w in pipeline.mixture_stages(config.data, config.total_steps))]
    steps = update.compile_steps(mcfg, config.optimizer, config.total_steps, mesh, config.batch_size,
                                 config.seq_len, len(used))
    assert steps.abstract_state.params["embed"].shape == (source["vocab_size"], source["hidden"])  # the real one
