"""HF transformers checkpoints <-> cpt_jax parameters: config.json and tensor names, both ways.

One table (`LAYER_TENSORS`, `TOP_TENSORS`) names every parameter on both sides with the layout
change between them; import and export are its two directions. HF stores a linear layer as
[out, in] and fuses heads into one axis; cpt_jax stores [in, out] with heads as their own axis
and the layers stacked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from cpt_jax.models import ModelConfig, spec

log = logging.getLogger(__name__)

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3"}

# Layout kinds: how one of our arrays (per layer) relates to the HF tensor.
COPY, LINEAR, IN_HEADS, OUT_HEADS, BIAS_HEADS = "copy", "linear", "in_heads", "out_heads", "bias_heads"

LAYER_TENSORS = [  # (our key under params["layers"], HF name after "model.layers.{i}.", kind)
    ("attn_norm", "input_layernorm.weight", COPY),
    ("q", "self_attn.q_proj.weight", IN_HEADS),
    ("k", "self_attn.k_proj.weight", IN_HEADS),
    ("v", "self_attn.v_proj.weight", IN_HEADS),
    ("q_bias", "self_attn.q_proj.bias", BIAS_HEADS),
    ("k_bias", "self_attn.k_proj.bias", BIAS_HEADS),
    ("v_bias", "self_attn.v_proj.bias", BIAS_HEADS),
    ("q_norm", "self_attn.q_norm.weight", COPY),
    ("k_norm", "self_attn.k_norm.weight", COPY),
    ("o", "self_attn.o_proj.weight", OUT_HEADS),
    ("mlp_norm", "post_attention_layernorm.weight", COPY),
    ("gate", "mlp.gate_proj.weight", LINEAR),
    ("up", "mlp.up_proj.weight", LINEAR),
    ("down", "mlp.down_proj.weight", LINEAR),
]
TOP_TENSORS = [  # (our key, HF name, kind)
    ("embed", "model.embed_tokens.weight", COPY),
    ("final_norm", "model.norm.weight", COPY),
    ("lm_head", "lm_head.weight", LINEAR),
]
# Buffers some checkpoints carry that are recomputed, not learned.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_shape(ours: tuple[int, ...], kind: str) -> tuple[int, ...]:
    if kind == COPY:
        return ours
    if kind == LINEAR:
        return ours[::-1]
    if kind == IN_HEADS:  # [d, n, hd] <- [n * hd, d]
        return (ours[1] * ours[2], ours[0])
    if kind == OUT_HEADS:  # [h, hd, d] <- [d, h * hd]
        return (ours[2], ours[0] * ours[1])
    return (ours[0] * ours[1],)  # BIAS_HEADS: [n, hd] <- [n * hd]


def from_hf(a: np.ndarray, ours: tuple[int, ...], kind: str) -> np.ndarray:
    if kind in (COPY, BIAS_HEADS):
        return a.reshape(ours)
    return a.T.reshape(ours)  # LINEAR, IN_HEADS, OUT_HEADS: [out, in] -> [in, out], then split heads


def to_hf(a: np.ndarray, kind: str) -> np.ndarray:
    if kind == COPY:
        return a
    if kind == BIAS_HEADS:
        return a.reshape(-1)
    if kind == IN_HEADS:
        return a.reshape(a.shape[0], -1).T
    if kind == OUT_HEADS:
        return a.reshape(-1, a.shape[-1]).T
    return a.T


def config_from_hf(c: dict, source: str) -> ModelConfig:
    """The ModelConfig of an HF config.json; anything this model cannot reproduce is refused,
    naming the field."""
    archs = c.get("architectures") or []
    arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ValueError(f"{source}: architectures={archs} is not supported; supported: {', '.join(ARCHITECTURES)}")

    def refuse(field: str, why: str):
        raise ValueError(f"{source}: {field}={c.get(field)!r} is not supported ({why})")

    if c.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "the MLP is SwiGLU with silu")
    if c.get("mlp_bias"):
        refuse("mlp_bias", "MLP layers have no bias")
    if arch != "qwen2" and c.get("attention_bias"):
        refuse("attention_bias", "o_proj has no bias; q/k/v biases are Qwen2's")
    rope = dict(c.get("rope_parameters") or {})  # transformers v5 moves rope_theta in here
    theta = c.get("rope_theta", rope.pop("rope_theta", 10000.0))
    scaling = dict(c.get("rope_scaling") or rope)
    scaling.pop("rope_theta", None)
    rope_type = scaling.pop("type", None) or scaling.get("rope_type")
    if rope_type in (None, "default"):
        scaling = {}
    elif rope_type in ("linear", "llama3"):
        scaling["rope_type"] = rope_type
    else:
        refuse("rope_scaling", f"rope_type {rope_type!r}; supported: linear, llama3")
    window = sliding_window(c, arch, refuse)
    heads = c["num_attention_heads"]
    try:
        return ModelConfig(
            vocab_size=c["vocab_size"], hidden=c["hidden_size"], intermediate=c["intermediate_size"],
            layers=c["num_hidden_layers"], heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or 0, rope_theta=float(theta), rope_scaling=tuple(scaling.items()),
            norm_eps=float(c.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3", sliding_window=window,
        )
    except KeyError as e:
        raise ValueError(f"{source}: config.json has no {e.args[0]}") from None
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def sliding_window(c: dict, arch: str, refuse: Callable) -> int:
    """The window every layer attends within (0: none). Mistral's applies to all layers; Qwen's
    to those `layer_types` (or use_sliding_window) say: all of them, or none, here."""
    if arch == "mistral":
        return int(c.get("sliding_window") or 0)
    types = set(c.get("layer_types") or ["sliding_attention" if c.get("use_sliding_window") else "full_attention"])
    if types == {"full_attention"}:
        return 0
    if types != {"sliding_attention"}:
        refuse("layer_types", "a sliding window on some layers only")
    return int(c.get("sliding_window") or 0)


def config_to_hf(cfg: ModelConfig, base: dict | None = None) -> dict:
    """config.json for `cfg`: `base` (the imported model's own config) updated, or a new Llama
    (Qwen2 where q/k/v have biases, Qwen3 where q and k are normed) config."""
    arch = ("Qwen3ForCausalLM" if cfg.qk_norm else "Qwen2ForCausalLM" if cfg.qkv_bias
            else "MistralForCausalLM" if cfg.sliding_window else "LlamaForCausalLM")
    if cfg.qk_norm and cfg.qkv_bias:
        raise ValueError("no transformers architecture has both q/k/v biases and q/k norms")
    c = dict(base) if base else {"architectures": [arch], "model_type": ARCHITECTURES[arch],
                                 "max_position_embeddings": 4096, "attention_bias": False}
    c.pop("rope_parameters", None)
    c.update({
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden, "intermediate_size": cfg.intermediate,
        "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) or None, "tie_word_embeddings": cfg.tie_embeddings,
        "sliding_window": cfg.sliding_window or None,
    })
    if arch.startswith("Qwen"):  # a window on every layer, or none
        kind = "sliding_attention" if cfg.sliding_window else "full_attention"
        c.update(use_sliding_window=bool(cfg.sliding_window), max_window_layers=0, layer_types=[kind] * cfg.layers)
    return c


def params_from_hf(cfg: ModelConfig, get: Callable[[str], np.ndarray], names: list[str], source: str,
                   place: Callable[[np.ndarray], Any] = lambda a: a) -> dict:
    """float32 params for `cfg` from HF-named tensors (`get(name)`), one tensor in memory at a
    time beside the result; `place` moves each finished array (e.g. to the device, so the host
    copy is freed at once). Every tensor is checked: a missing one or a wrong shape is named."""
    abstract = spec(cfg).abstract_params
    available, used = set(names), set()

    def take(name: str, ours: tuple[int, ...], kind: str) -> np.ndarray:
        if name not in available:
            raise ValueError(f"{source}: tensor {name} is missing")
        a = get(name)
        if tuple(a.shape) != hf_shape(ours, kind):
            raise ValueError(f"{source}: tensor {name} has shape {tuple(a.shape)}, the config implies "
                             f"{hf_shape(ours, kind)}")
        used.add(name)
        return from_hf(np.asarray(a, np.float32), ours, kind)

    params = {key: place(take(name, abstract[key].shape, kind)) for key, name, kind in TOP_TENSORS if key in abstract}
    params["layers"] = {}
    for key, name, kind in LAYER_TENSORS:
        if key not in abstract["layers"]:
            continue
        stacked = np.empty(abstract["layers"][key].shape, np.float32)
        for i in range(cfg.layers):
            stacked[i] = take(f"model.layers.{i}.{name}", stacked.shape[1:], kind)
        params["layers"][key] = place(stacked)
        del stacked
    if cfg.tie_embeddings:
        used.add("lm_head.weight")  # some tied checkpoints store the copy
    unused = sorted(n for n in available - used if not n.endswith(IGNORED_SUFFIXES))
    if unused:
        raise ValueError(f"{source}: tensor {unused[0]} is not part of this architecture"
                         + (f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""))
    return params


def params_to_hf(cfg: ModelConfig, params: dict, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """HF-named tensors of `params`, one at a time, cast to `dtype`."""
    for key, name, kind in TOP_TENSORS:
        if key in params:
            yield name, np.ascontiguousarray(to_hf(np.asarray(params[key]), kind)).astype(dtype)
    for i in range(cfg.layers):
        for key, name, kind in LAYER_TENSORS:
            if key in params["layers"]:
                a = np.asarray(params["layers"][key][i])
                yield f"model.layers.{i}.{name}", np.ascontiguousarray(to_hf(a, kind)).astype(dtype)


def sentencepiece_to_tokenizer_json(proto: bytes) -> str:
    """A sentencepiece BPE model as an HF tokenizer.json (the layout of Llama 2's): the word
    marker prepended and spaces replaced by a normalizer, merges recovered from the piece
    scores, bytes for anything else. transformers' own reading of a bare tokenizer.model
    segments leading spaces differently, so export writes this instead."""
    import tokenizers
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import decoders, normalizers

    m = pb.ModelProto.FromString(proto)
    if m.trainer_spec.model_type != pb.TrainerSpec.BPE:
        raise ValueError("only sentencepiece BPE models convert to tokenizer.json")
    vocab = {p.piece: i for i, p in enumerate(m.pieces)}
    merges = []  # (left, right, score of the merged piece): higher scores merge first
    for p in m.pieces:
        if p.type == pb.ModelProto.SentencePiece.NORMAL:
            splits = [(p.piece[:k], p.piece[k:]) for k in range(1, len(p.piece))]
            merges += sorted(((a, b, p.score) for a, b in splits if a in vocab and b in vocab),
                             key=lambda x: (vocab[x[0]], vocab[x[1]]))
    merges.sort(key=lambda x: (-x[2], len(x[0]), len(x[1])))
    unk = m.pieces[m.trainer_spec.unk_id].piece if m.trainer_spec.unk_id >= 0 else None
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [(a, b) for a, b, _ in merges], unk_token=unk,
                                                     fuse_unk=True, byte_fallback=m.trainer_spec.byte_fallback))
    steps = [normalizers.Prepend("\u2581")] if m.normalizer_spec.add_dummy_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if m.normalizer_spec.add_dummy_prefix else []))
    tok.add_special_tokens([tokenizers.AddedToken(p.piece, special=True, normalized=False) for p in m.pieces
                            if p.type in (pb.ModelProto.SentencePiece.CONTROL, pb.ModelProto.SentencePiece.UNKNOWN)])
    return tok.to_str()
