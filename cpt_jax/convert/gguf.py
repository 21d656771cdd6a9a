"""GGUF files (llama.cpp's format) of the llama, qwen2, qwen3, gemma2, gemma3 and olmo2
architectures as an HF config, HF-named float32 tensors and a tokenizer, so that import has one
path after reading.

Tensors are dequantized to float32 with the `gguf` package (every quantization it knows: Q4_0,
Q4_1, Q8_0, K-quants, ...). llama.cpp stores q and k with the rows of each head interleaved for
its RoPE (the llama architecture only); they are permuted back to HF's half-rotation layout.
Llama 3.1+ files carry their RoPE scaling as per-frequency factors (`rope_freqs.weight`), read back
into HF's llama3 rope_scaling. llama.cpp stores Gemma's norm weights plus one (the scale it
applies); they are stored back as Gemma's own. What a file does not say takes llama.cpp's value:
Gemma's windowed layers (every second, or five in six), Gemma 3's local RoPE theta (10,000) and
its attention scale (head_dim^-1/2).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re

import gguf
import numpy as np
import tokenizers
from tokenizers import pre_tokenizers

from cpt_jax.convert.hf import FAMILIES, KINDS, short
from cpt_jax.data.tokenizer import HFTokenizer, SentencePieceTokenizer
from cpt_jax.models.rope import rope_frequencies

log = logging.getLogger(__name__)

# GGUF tensor name (after "blk.{i}." for layers) -> HF name (after "model.layers.{i}.").
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
# Gemma's norms also follow attention and the MLP: its ffn_norm is the one before the MLP.
SANDWICH_NAMES = {"ffn_norm.weight": "pre_feedforward_layernorm.weight"}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM", "olmo2": "Olmo2ForCausalLM"}
GEMMA3_LOCAL_THETA = 10000.0
TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}

ROPE_FREQS = "rope_freqs.weight"
LLAMA3_CONTEXT = 8192  # Llama 3's original context: llama.cpp's default where the file does not say


def llama3_scaling(factors: np.ndarray, head_dim: int, theta: float, context: int, where: str) -> dict:
    """The HF llama3 rope_scaling behind llama.cpp's `rope_freqs` (its frequency i is
    theta^(-2i/head_dim) / factors[i]). The factor is the largest; between the two bands the
    factors are 1 / ((1 - s) / factor + s) with s linear in context / wavelength, so two such
    points give low_freq_factor and high_freq_factor; the result is checked to give every factor."""
    factors = np.asarray(factors, np.float64).reshape(-1)
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if factors.shape != inv.shape:
        raise ValueError(f"{where}: tensor {ROPE_FREQS} has {factors.size} factors, head_dim {head_dim} needs "
                         f"{inv.size}")
    factor = float(factors.max())
    x = context * inv / (2 * np.pi)  # context / wavelength
    band = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if factor <= 1 or band.sum() < 2:
        raise ValueError(f"{where}: tensor {ROPE_FREQS} does not pin down Llama 3's rope scaling (factor {factor}, "
                         f"{int(band.sum())} frequencies between its bands; 2 are needed)")
    smooth = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(x[band], smooth, 1)  # smooth = (x - low) / (high - low)
    low = -intercept / slope
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
               "high_freq_factor": float(low + 1 / slope), "original_max_position_embeddings": int(context)}
    ours = inv / np.asarray(rope_frequencies(head_dim, theta, tuple(scaling.items())), np.float64)
    if not np.allclose(ours, factors, rtol=1e-4):
        raise ValueError(f"{where}: tensor {ROPE_FREQS} is not Llama 3's rope scaling (closest: {scaling})")
    return scaling


# llama.cpp's pre-tokenizer names -> the split regex its BPE vocabulary was learned with.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "default": [_GPT2], "gpt2": [_GPT2],
    "smollm": [r"\p{N}", _GPT2],  # SmolLM: digits one by one, then GPT-2's split
    "llama3": [_LLAMA3], "llama-bpe": [_LLAMA3], "llama-v3": [_LLAMA3], "smaug-bpe": [_LLAMA3],
    "qwen2": [_QWEN2],
}


class _BoundedReader(gguf.GGUFReader):
    """A GGUFReader that refuses to read past the end of the file. The header's counts and sizes
    come from the file, and every item read advances through it, so a malformed header now ends
    within a file's length of reads: the plain reader walks a declared 2^40-element array to the
    end, growing memory without bound."""

    def _get(self, offset: int, dtype, count: int = 1, override_order=None) -> np.ndarray:
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > self.data.size:
            last = next(reversed(getattr(self, "fields", {})), "the magic")
            raise ValueError(f"{int(count)} x {np.dtype(dtype)} at byte {int(offset)} run past the end of the file "
                             f"({self.data.size} bytes), in or after field {last}")
        return super()._get(offset, dtype, count, override_order)

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        """Each tensor's name, type, element count and data range checked (in Python integers,
        which do not wrap) before the plain reader maps its data."""
        for field in fields:
            _, name, _, dims, raw_type, offset = field.parts
            name = bytes(name).decode("utf-8", "backslashreplace")
            try:
                block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_type[0]))]
            except (ValueError, KeyError):
                raise ValueError(f"tensor {name}: type {int(raw_type[0])} is not a GGML type") from None
            n = math.prod(int(d) for d in dims)
            if n % block:
                raise ValueError(f"tensor {name}: {n} elements are not whole blocks of {block}")
            begin = start_offs + int(offset[0])
            end = begin + n // block * size
            if end > self.data.size:
                raise ValueError(f"tensor {name}: data [{begin}, {end}) runs past the end of the file "
                                 f"({self.data.size} bytes)")
        super()._build_tensors(start_offs, fields)


_MISSING = object()


class GGUFFile:
    def __init__(self, path: str):
        self.path = path
        try:
            self.reader = _BoundedReader(path)
        except (ValueError, KeyError, IndexError) as e:  # the gguf package's own errors for bad headers
            raise ValueError(f"{path}: malformed GGUF header: {e}") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = self.field("general.architecture", kind="str")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"{path}: general.architecture={self.arch!r} is not supported; supported: "
                             f"{', '.join(ARCHITECTURES)}")
        self.gemma = self.arch.startswith("gemma")

    def field(self, name: str, default=_MISSING, kind: str = "size"):
        """The metadata value `name`, which must be a `kind` (of hf.KINDS); `default` where the file
        has none, and without a default it must have one. Else ValueError naming the file and key."""
        f = self.reader.fields.get(name)
        if f is None:
            if default is _MISSING:
                raise ValueError(f"{self.path}: metadata {name} is missing")
            return default
        try:
            value = f.contents()
        except (ValueError, IndexError) as e:  # a string that is not UTF-8, a type with no value
            raise ValueError(f"{self.path}: metadata {name} is unreadable ({e})") from None
        said, ok = KINDS[kind]
        if not ok(value):
            raise ValueError(f"{self.path}: metadata {name}={short(value)} is not {said}")
        return value

    def token_id(self, role: str, tokens: list[str]) -> int | None:
        """The id of the `role` ("bos", "eos", "unknown", "padding") token, if the file names one."""
        name = f"tokenizer.ggml.{role}_token_id"
        i = self.field(name, None, "int")
        if i is not None and not 0 <= i < len(tokens):
            raise ValueError(f"{self.path}: metadata {name}={i} is not a token of the {len(tokens)} in "
                             f"tokenizer.ggml.tokens")
        return i

    def hf_config(self) -> dict:
        """The HF config.json this file's metadata describes."""
        g = lambda key, default=_MISSING, kind="size": self.field(f"{self.arch}.{key}", default, kind)  # noqa: E731
        heads, hidden = g("attention.head_count"), g("embedding_length")
        tokens = self.field("tokenizer.ggml.tokens", kind="strings")
        c = {
            "architectures": [ARCHITECTURES[self.arch]], "model_type": FAMILIES[ARCHITECTURES[self.arch]][0],
            "vocab_size": len(tokens), "hidden_size": hidden,
            "intermediate_size": g("feed_forward_length"), "num_hidden_layers": g("block_count"),
            "num_attention_heads": heads, "num_key_value_heads": g("attention.head_count_kv", heads),
            "head_dim": g("attention.key_length", 0, "int") or hidden // heads,
            "rms_norm_eps": g("attention.layer_norm_rms_epsilon", kind="number"),
            "rope_theta": g("rope.freq_base", 10000.0, "number"), "max_position_embeddings": g("context_length", 4096),
            **({} if self.gemma else {"hidden_act": "silu"}),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "attention_bias": "blk.0.attn_q.bias" in self.tensors,
            "bos_token_id": self.token_id("bos", tokens), "eos_token_id": self.token_id("eos", tokens),
        }
        scaling = g("rope.scaling.type", "none", "str")
        if scaling == "linear":
            c["rope_scaling"] = {"rope_type": "linear", "factor": g("rope.scaling.factor", kind="number")}
        elif scaling != "none":
            raise ValueError(f"{self.path}: {self.arch}.rope.scaling.type={scaling!r} is not supported; supported: "
                             f"linear")
        if ROPE_FREQS in self.tensors:  # Llama 3.1+: the llama3 scaling, baked into per-frequency factors
            factors = self.get(ROPE_FREQS, ROPE_FREQS, 1, 1)
            context = g("rope.scaling.original_context_length", LLAMA3_CONTEXT)
            c["rope_scaling"] = llama3_scaling(factors, c["head_dim"], c["rope_theta"], context, self.path)
        if self.gemma:
            c.update(self._gemma(g, c))
        return c

    def _gemma(self, g, c: dict) -> dict:
        """The Gemma fields of the config: window, windowed layers, soft-caps, attention scale."""
        pattern = g("attention.sliding_window_pattern", 2 if self.arch == "gemma2" else 6, "window pattern")
        layers = c["num_hidden_layers"]
        if isinstance(pattern, list):  # newer llama.cpp: one flag per layer, true where windowed
            types = ["sliding_attention" if p else "full_attention" for p in pattern]
        else:
            types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
        out = {"sliding_window": g("attention.sliding_window"), "layer_types": types,
               "query_pre_attn_scalar": c["head_dim"], "hidden_activation": "gelu_pytorch_tanh",
               "attn_logit_softcapping": g("attn_logit_softcapping", None, "number"),
               "final_logit_softcapping": g("final_logit_softcapping", None, "number")}
        if self.arch == "gemma3":
            out["rope_local_base_freq"] = g("rope.freq_base_swa", GEMMA3_LOCAL_THETA, "number")
        return out

    def hf_names(self) -> dict[str, str]:
        """HF name -> GGUF name of every tensor in the file."""
        out = {}
        for name in self.tensors:
            if name == ROPE_FREQS:  # read into the config's rope_scaling, not a parameter
                continue
            if name in TOP_NAMES:
                out[TOP_NAMES[name]] = name
                continue
            m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
            names = {**LAYER_NAMES, **SANDWICH_NAMES} if self.gemma else LAYER_NAMES
            # Unknown tensors keep their GGUF name, so the import error names them.
            out[f"model.layers.{m[1]}.{names[m[2]]}" if m and m[2] in names else name] = name
        return out

    def get(self, hf_name: str, gguf_name: str, heads: int, kv_heads: int) -> np.ndarray:
        t = self.tensors[gguf_name]
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        a = a.reshape(tuple(int(d) for d in reversed(t.shape)))
        for proj, n in (("q_proj", heads), ("k_proj", kv_heads)):
            if self.arch == "llama" and f"self_attn.{proj}." in hf_name:  # undoes convert_hf_to_gguf.py's permute
                if a.shape[0] % (2 * n):
                    raise ValueError(f"{self.path}: tensor {gguf_name} has {a.shape[0]} rows, not pairs of rows for "
                                     f"each of {n} heads")
                a = a.reshape(n, a.shape[0] // n // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        if self.gemma and hf_name.endswith("norm.weight"):
            a = a - 1.0
        return a

    def per_token(self, name: str, tokens: list[str], default, kind: str) -> list:
        """An array of one value per token (`default` for each where the file has none)."""
        values = self.field(name, [default] * len(tokens), kind)
        if len(values) != len(tokens):
            raise ValueError(f"{self.path}: metadata {name} has {len(values)} values for {len(tokens)} tokens")
        return values

    def tokenizer(self):
        """The file's tokenizer: byte-level BPE ("gpt2") as an HF tokenizer.json, sentencepiece
        ("llama") as a sentencepiece model."""
        kind = self.field("tokenizer.ggml.model", kind="str")
        tokens = self.field("tokenizer.ggml.tokens", kind="strings")
        types = self.per_token("tokenizer.ggml.token_type", tokens, 1, "ints")
        if any(not 1 <= k <= 6 for k in types):  # sentencepiece's piece types, which GGUF copies
            raise ValueError(f"{self.path}: metadata tokenizer.ggml.token_type holds {max(types, key=abs)}, not a "
                             f"piece type (1-6)")
        special = {role: self.token_id(role, tokens) for role in ("bos", "eos", "unknown", "padding")}
        if kind == "gpt2":
            return self._byte_level_bpe(tokens, types, special)
        if kind == "llama":
            return self._sentencepiece(tokens, types, special)
        raise ValueError(f"{self.path}: tokenizer.ggml.model={kind!r} is not supported; supported: gpt2, llama")

    def _byte_level_bpe(self, tokens, types, special) -> HFTokenizer:
        pre = self.field("tokenizer.ggml.pre", "default", "str")
        if pre not in PRE_TOKENIZERS:
            log.warning("%s: tokenizer.ggml.pre=%r is unknown here; splitting text as GPT-2 does", self.path, pre)
        merges = [tuple(m.split(" ", 1)) for m in self.field("tokenizer.ggml.merges", kind="strings")]
        bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
        if bad is not None:
            raise ValueError(f"{self.path}: metadata tokenizer.ggml.merges[{bad}]={merges[bad][0]!r} is not two pieces")
        try:
            model = tokenizers.models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                                          ignore_merges=pre in ("llama3", "llama-bpe", "llama-v3"))
        except Exception as e:  # noqa: BLE001  (tokenizers raises a plain Exception for a vocabulary it refuses)
            raise ValueError(f"{self.path}: metadata tokenizer.ggml.merges: {e}") from None
        tok = tokenizers.Tokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated") for r in PRE_TOKENIZERS.get(pre, [_GPT2])]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = tokenizers.decoders.ByteLevel()
        tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types) if k == 3])
        config = {"add_bos_token": self.field("tokenizer.ggml.add_bos_token", False, "bool")}
        for role, name in (("bos", "bos"), ("eos", "eos"), ("unknown", "unk"), ("padding", "pad")):
            if special[role] is not None:
                config[f"{name}_token"] = tokens[special[role]]
        return HFTokenizer(tok.to_str(), json.dumps(config), source=f"{self.path} (tokenizer)")

    def _sentencepiece(self, tokens, types, special) -> SentencePieceTokenizer:
        from sentencepiece import sentencepiece_model_pb2 as pb

        scores = self.per_token("tokenizer.ggml.scores", tokens, 0.0, "numbers")
        m = pb.ModelProto()
        for t, s, k in zip(tokens, scores, types):
            # Gemma's files spell its whitespace-run pieces with spaces; sentencepiece matches
            # them on the escaped text, as its own model spells them.
            t = "\u2581" * len(t) if t and not t.strip(" ") else t
            m.pieces.add(piece=t, score=float(s), type=k)  # GGUF copies sentencepiece's piece types
        m.trainer_spec.model_type = pb.TrainerSpec.BPE
        m.trainer_spec.byte_fallback = 6 in types
        m.trainer_spec.vocab_size = len(tokens)
        for role, name in (("bos", "bos"), ("eos", "eos"), ("unknown", "unk"), ("padding", "pad")):
            i = special[role]
            setattr(m.trainer_spec, f"{name}_id", -1 if i is None else i)
            if i is not None:  # sentencepiece finds its special tokens by piece
                setattr(m.trainer_spec, f"{name}_piece", m.pieces[i].piece)
        m.normalizer_spec.name = "identity"
        m.normalizer_spec.add_dummy_prefix = self.field("tokenizer.ggml.add_space_prefix", True, "bool")
        m.normalizer_spec.remove_extra_whitespaces = False
        m.normalizer_spec.escape_whitespaces = True
        # llama.cpp prepends BOS to a sentencepiece vocabulary unless the file says not to.
        return SentencePieceTokenizer(m.SerializeToString(), self.field("tokenizer.ggml.add_bos_token", True, "bool"),
                                      source=f"{self.path} (tokenizer)")


def is_gguf(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(".gguf")

