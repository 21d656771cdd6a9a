"""HF transformers checkpoints <-> cpt_jax parameters: config.json and tensor names, both ways.

One table (`LAYER_TENSORS`, `TOP_TENSORS`) names every parameter on both sides with the layout
change between them; import and export are its two directions. HF stores a linear layer as
[out, in] and fuses heads into one axis; cpt_jax stores [in, out] with heads as their own axis
and the layers stacked.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from cpt_jax.models import ModelConfig, rope, spec

log = logging.getLogger(__name__)

# Each family: its model_type, and the ModelConfig fields that are fixed for it (the rest, such as
# the window or the soft-caps, come from its config.json). Import builds the config from these;
# export writes the first family whose fixed fields are the model's and that can say the rest.
LLAMA = dict(norms="pre", qk_norm="", qkv_bias=False, norm_offset=0.0, activation="silu", embed_scale=False)
GEMMA = dict(LLAMA, norms="sandwich", norm_offset=1.0, activation="gelu_tanh", embed_scale=True)
FAMILIES = {  # HF architecture -> (model_type, fixed fields, variable fields it can express)
    "LlamaForCausalLM": ("llama", LLAMA, ()),
    "MistralForCausalLM": ("mistral", LLAMA, ("sliding_window",)),
    "Qwen2ForCausalLM": ("qwen2", dict(LLAMA, qkv_bias=True), ("sliding_window", "full_attention_layers")),
    "Qwen3ForCausalLM": ("qwen3", dict(LLAMA, qk_norm="head"), ("sliding_window", "full_attention_layers")),
    "Gemma2ForCausalLM": ("gemma2", GEMMA, ("sliding_window", "full_attention_layers", "query_pre_attn_scalar",
                                            "attn_softcap", "final_softcap")),
    "Gemma3ForCausalLM": ("gemma3_text", dict(GEMMA, qk_norm="head"),
                          ("sliding_window", "full_attention_layers", "query_pre_attn_scalar", "attn_softcap",
                           "final_softcap", "local_rope_theta")),
    "Olmo2ForCausalLM": ("olmo2", dict(LLAMA, norms="post", qk_norm="proj"), ()),
}
ARCHITECTURES = list(FAMILIES)
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}  # HF name -> ours

# What a value read from a file must be, by kind: (how an error says it, test). Checked before
# anything computes with it, so a malformed file ends in one error naming the field.
KINDS = {
    "size": ("a positive integer", lambda v: type(v) is int and v > 0),
    "int": ("an integer", lambda v: type(v) is int),
    "number": ("a number", lambda v: type(v) in (int, float)),
    "bool": ("true or false", lambda v: type(v) is bool),
    "str": ("a string", lambda v: type(v) is str),
    "object": ("an object", lambda v: type(v) is dict),
    "strings": ("an array of strings", lambda v: type(v) is list and all(type(x) is str for x in v)),
    "numbers": ("an array of numbers", lambda v: type(v) is list and all(type(x) in (int, float) for x in v)),
    "ints": ("an array of integers", lambda v: type(v) is list and all(type(x) is int for x in v)),
    "window pattern": ("a positive integer or an array of booleans",
                       lambda v: (type(v) is int and v > 0) or (type(v) is list and all(type(x) is bool for x in v))),
}
# The config.json fields import reads, by kind (null or absent: the default); those it cannot do without.
CONFIG_KINDS = {
    "architectures": "strings", "vocab_size": "size", "hidden_size": "size", "intermediate_size": "size",
    "num_hidden_layers": "size", "num_attention_heads": "size", "num_key_value_heads": "size", "head_dim": "int",
    "rms_norm_eps": "number", "tie_word_embeddings": "bool", "hidden_act": "str", "hidden_activation": "str",
    "mlp_bias": "bool", "attention_bias": "bool", "use_bidirectional_attention": "bool", "rope_theta": "number",
    "rope_local_base_freq": "number", "rope_scaling": "object", "rope_parameters": "object", "sliding_window": "int",
    "use_sliding_window": "bool", "max_window_layers": "int", "sliding_window_pattern": "size",
    "layer_types": "strings", "query_pre_attn_scalar": "number", "attn_logit_softcapping": "number",
    "final_logit_softcapping": "number",
}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# The fields of a rope_scaling (or rope_parameters, also per layer type) that import reads.
ROPE_KINDS = {"rope_type": "str", "type": "str", "rope_theta": "number", "factor": "number",
              "low_freq_factor": "number", "high_freq_factor": "number", "original_max_position_embeddings": "size"}


def short(value: Any) -> str:
    """A value as an error quotes it: a long array by its first items and length."""
    if isinstance(value, list) and len(value) > 4:
        return f"[{', '.join(map(repr, value[:3]))}, ... ({len(value)} items)]"
    return repr(value)


def check_config(c: Any, source: str) -> None:
    """config.json's fields that import reads, each of its kind (CONFIG_KINDS, ROPE_KINDS), and
    the REQUIRED ones present; else one ValueError naming the field."""
    if not isinstance(c, dict):
        raise ValueError(f"{source}: not a JSON object")
    missing = next((f for f in REQUIRED if c.get(f) is None), None)
    if missing:
        raise ValueError(f"{source}: {missing} is missing")
    given = [(f, c[f], kind) for f, kind in CONFIG_KINDS.items() if c.get(f) is not None]
    for f in ("rope_scaling", "rope_parameters"):
        rope = c.get(f)
        if not isinstance(rope, dict):
            continue
        parts = [(f, rope)] + [(f"{f}.{k}", v) for k, v in rope.items() if f == "rope_parameters" and type(v) is dict]
        given += [(f"{name}.{k}", part[k], kind) for name, part in parts for k, kind in ROPE_KINDS.items()
                  if part.get(k) is not None]
    for field, value, kind in given:
        said, ok = KINDS[kind]
        if not ok(value):
            raise ValueError(f"{source}: {field}={short(value)} is not {said}")


# Layout kinds: how one of our arrays (per layer) relates to the HF tensor.
COPY, LINEAR, IN_HEADS, OUT_HEADS, FLAT = "copy", "linear", "in_heads", "out_heads", "flat"

LAYER_TENSORS = [  # (our key under params["layers"], HF name after "model.layers.{i}.", kind)
    ("attn_norm", "input_layernorm.weight", COPY),
    ("q", "self_attn.q_proj.weight", IN_HEADS),
    ("k", "self_attn.k_proj.weight", IN_HEADS),
    ("v", "self_attn.v_proj.weight", IN_HEADS),
    ("q_bias", "self_attn.q_proj.bias", FLAT),
    ("k_bias", "self_attn.k_proj.bias", FLAT),
    ("v_bias", "self_attn.v_proj.bias", FLAT),
    ("q_norm", "self_attn.q_norm.weight", FLAT),  # [head_dim], or OLMo 2's [heads * head_dim]
    ("k_norm", "self_attn.k_norm.weight", FLAT),
    ("o", "self_attn.o_proj.weight", OUT_HEADS),
    ("attn_post_norm", "post_attention_layernorm.weight", COPY),
    ("mlp_norm", "pre_feedforward_layernorm.weight", COPY),
    ("mlp_post_norm", "post_feedforward_layernorm.weight", COPY),
    ("gate", "mlp.gate_proj.weight", LINEAR),
    ("up", "mlp.up_proj.weight", LINEAR),
    ("down", "mlp.down_proj.weight", LINEAR),
]
# Llama's norm before the MLP is named for where it sits: after attention.
PRE_NORM_NAMES = {"mlp_norm": "post_attention_layernorm.weight"}
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
    return (int(np.prod(ours)),)  # FLAT: [n, hd] <- [n * hd]


def from_hf(a: np.ndarray, ours: tuple[int, ...], kind: str) -> np.ndarray:
    if kind in (COPY, FLAT):
        return a.reshape(ours)
    return a.T.reshape(ours)  # LINEAR, IN_HEADS, OUT_HEADS: [out, in] -> [in, out], then split heads


def to_hf(a: np.ndarray, kind: str) -> np.ndarray:
    if kind == COPY:
        return a
    if kind == FLAT:
        return a.reshape(-1)
    if kind == IN_HEADS:
        return a.reshape(a.shape[0], -1).T
    if kind == OUT_HEADS:
        return a.reshape(-1, a.shape[-1]).T
    return a.T


def layer_tensors(cfg: ModelConfig) -> list[tuple[str, str, str]]:
    """LAYER_TENSORS with the HF names of `cfg`'s family."""
    names = PRE_NORM_NAMES if cfg.norms == "pre" else {}
    return [(key, names.get(key, name), kind) for key, name, kind in LAYER_TENSORS]


def config_from_hf(c: dict, source: str) -> ModelConfig:
    """The ModelConfig of an HF config.json; anything malformed (`check_config`) or that this
    model cannot reproduce is refused, naming the field."""
    check_config(c, source)
    archs = c.get("architectures") or []
    arch = next((a for a in archs if a in FAMILIES), None)
    if arch is None:
        raise ValueError(f"{source}: architectures={archs} is not supported; supported: {', '.join(FAMILIES)}")
    fixed, variable = FAMILIES[arch][1], FAMILIES[arch][2]

    def refuse(field: str, why: str):
        raise ValueError(f"{source}: {field}={c.get(field)!r} is not supported ({why})")

    act_field = "hidden_activation" if "hidden_activation" in c else "hidden_act"
    if ACTIVATIONS.get(c.get(act_field, "silu")) != fixed["activation"]:
        refuse(act_field, f"{arch}'s MLP is gated by {fixed['activation']}")
    if c.get("mlp_bias"):
        refuse("mlp_bias", "MLP layers have no bias")
    if not fixed["qkv_bias"] and c.get("attention_bias"):
        refuse("attention_bias", "o_proj has no bias; q/k/v biases are Qwen2's")
    if c.get("use_bidirectional_attention"):
        refuse("use_bidirectional_attention", "the model is a causal LM")
    full_rope, local_theta = rope_from_hf(c, refuse)
    window, full_layers = sliding_window(c, arch, refuse)
    softcaps = {"attn_softcap": c.get("attn_logit_softcapping"), "final_softcap": c.get("final_logit_softcapping")}
    heads = c["num_attention_heads"]
    extra = {"query_pre_attn_scalar": float(c.get("query_pre_attn_scalar") or 0),
             **{k: float(v or 0) for k, v in softcaps.items()}, "local_rope_theta": local_theta}
    try:
        return ModelConfig(
            vocab_size=c["vocab_size"], hidden=c["hidden_size"], intermediate=c["intermediate_size"],
            layers=c["num_hidden_layers"], heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or 0, norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(c.get("tie_word_embeddings", arch.startswith("Gemma"))), **full_rope,
            sliding_window=window, full_attention_layers=full_layers, **fixed,
            **{k: v for k, v in extra.items() if k in variable},
        )
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def rope_from_hf(c: dict, refuse: Callable) -> tuple[dict, float]:
    """(rope_theta and rope_scaling of the full-attention layers, the windowed layers' own theta
    or 0). transformers v5 moves rope_theta into `rope_parameters`, per layer type for Gemma 3.
    The scaling is made whole as transformers standardises it: what it would read from
    max_position_embeddings is written into it, so the model computes from it alone."""
    params = dict(c.get("rope_parameters") or {})
    local_theta = 0.0
    if "full_attention" in params:  # Gemma 3: {"full_attention": {...}, "sliding_attention": {...}}
        local = dict(params.get("sliding_attention") or {})
        if local.get("rope_type", "default") != "default":
            refuse("rope_parameters", "scaled RoPE on the sliding-window layers")
        local_theta = float(local.get("rope_theta", 10000.0))
        params = dict(params["full_attention"])
    elif "rope_local_base_freq" in c:  # Gemma 3 config written by transformers v4
        local_theta = float(c["rope_local_base_freq"])
    theta = c.get("rope_theta", params.pop("rope_theta", 10000.0))
    scaling = dict(c.get("rope_scaling") or params)
    scaling.pop("rope_theta", None)
    scaling["rope_type"] = scaling.pop("type", None) or scaling.get("rope_type") or "default"
    kind = scaling["rope_type"]
    if kind == "default":
        scaling = {}
    elif kind in ("llama3", "yarn", "longrope"):  # a top-level original length wins (Phi-3's)
        scaling["original_max_position_embeddings"] = (c.get("original_max_position_embeddings") or scaling.get(
            "original_max_position_embeddings") or c.get("max_position_embeddings"))
    elif kind == "dynamic":  # it rescales past max_position_embeddings
        scaling["original_max_position_embeddings"] = c.get("max_position_embeddings")
    if kind in ("yarn", "longrope") and scaling.get("factor") is None and c.get("max_position_embeddings"):
        scaling["factor"] = c["max_position_embeddings"] / scaling["original_max_position_embeddings"]
    try:
        rope.check(scaling, None)  # longrope's factors are counted against head_dim by ModelConfig
    except ValueError as e:
        refuse("rope_scaling" if "rope_scaling" in c else "rope_parameters", str(e))
    return {"rope_theta": float(theta), "rope_scaling": tuple(scaling.items())}, local_theta


def sliding_window(c: dict, arch: str, refuse: Callable) -> tuple[int, tuple[int, ...]]:
    """(the sliding window, the layers that attend to all positions though it is set). Mistral's
    window applies to every layer; Qwen's to the layers `layer_types` (or max_window_layers) say,
    and only with use_sliding_window; Gemma's to its sliding layers (every second for Gemma 2,
    five in six for Gemma 3, where a config does not list them)."""
    layers = c["num_hidden_layers"]
    if arch == "MistralForCausalLM":
        return int(c.get("sliding_window") or 0), ()
    if arch.startswith("Qwen"):
        window = int(c.get("sliding_window") or 0) if c.get("use_sliding_window") else 0
        first = c.get("max_window_layers", 28)
        default = ["sliding_attention" if window and i >= first else "full_attention" for i in range(layers)]
    elif arch.startswith("Gemma"):
        window = int(c.get("sliding_window") or 0)
        pattern = c.get("sliding_window_pattern", 2 if arch.startswith("Gemma2") else 6)
        default = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
    else:
        return 0, ()
    types = list(c.get("layer_types") or default)
    if len(types) != layers or set(types) - {"sliding_attention", "full_attention"}:
        refuse("layer_types", f"one of sliding_attention, full_attention for each of the {layers} layers")
    if not window or "sliding_attention" not in types:
        return 0, ()
    return window, tuple(i for i, t in enumerate(types) if t == "full_attention")


def family(cfg: ModelConfig) -> str:
    """The HF architecture that expresses `cfg`: its fixed fields are the family's, and the family
    can say the rest (a window, soft-caps, ...); refused, naming the field, where none can."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    values = {"sliding_window": cfg.sliding_window, "full_attention_layers": cfg.full_attention_layers,
              "query_pre_attn_scalar": cfg.query_pre_attn_scalar, "attn_softcap": cfg.attn_softcap,
              "final_softcap": cfg.final_softcap, "local_rope_theta": cfg.local_rope_theta}
    unsaid = None
    for arch, (_, fixed, variable) in FAMILIES.items():
        if any(getattr(cfg, k) != v for k, v in fixed.items()):
            continue
        unsaid = next((k for k, v in values.items() if v != defaults[k] and k not in variable), None)
        if unsaid is None:
            return arch
    if unsaid is not None:
        raise ValueError(f"model {unsaid}={getattr(cfg, unsaid)!r}: no transformers architecture of this family "
                         f"has it; supported: {', '.join(FAMILIES)}")
    fields = ", ".join(f"{k}={getattr(cfg, k)!r}" for k in LLAMA)
    raise ValueError(f"model ({fields}): no transformers architecture has this combination; supported: "
                     f"{', '.join(FAMILIES)}")


def _number(x: float) -> int | float:
    """x as an int where it is one (transformers' configs type such fields int)."""
    return int(x) if float(x).is_integer() else x


def config_to_hf(cfg: ModelConfig, base: dict | None = None) -> dict:
    """config.json for `cfg`: `base` (the imported model's own config) updated, or a new one of
    the family that expresses it (`family`)."""
    arch = family(cfg)
    model_type, fixed, variable = FAMILIES[arch]
    c = dict(base) if base else {"architectures": [arch], "model_type": model_type,
                                 "max_position_embeddings": 4096, "attention_bias": False}
    for key in ("rope_parameters", "rope_local_base_freq", "sliding_window_pattern", "hidden_act",
                "hidden_activation"):
        c.pop(key, None)
    c.update({
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden, "intermediate_size": cfg.intermediate,
        "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) or None, "tie_word_embeddings": cfg.tie_embeddings,
        "sliding_window": cfg.sliding_window or None,
        "hidden_activation" if arch.startswith("Gemma") else "hidden_act":
            {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[cfg.activation],
    })
    # The scaling holds its original length; a top-level one (Phi-3's) would override it in transformers.
    c.pop("original_max_position_embeddings", None)
    if c["rope_scaling"] and c["rope_scaling"]["rope_type"] == "dynamic":  # its original length, where HF reads it
        c["max_position_embeddings"] = c["rope_scaling"].pop("original_max_position_embeddings")
    types = ["sliding_attention" if w else "full_attention" for w in cfg.windowed()]
    if "full_attention_layers" in variable:
        c["layer_types"] = types
    if arch.startswith("Qwen"):
        c.update(use_sliding_window=bool(cfg.sliding_window), max_window_layers=0)
    if arch.startswith("Gemma"):
        c.update(query_pre_attn_scalar=_number(cfg.query_pre_attn_scalar or cfg.head_dim),
                 attn_logit_softcapping=cfg.attn_softcap or None, final_logit_softcapping=cfg.final_softcap or None)
        if not cfg.sliding_window:  # Gemma's layers are sliding unless said otherwise
            c["layer_types"] = ["full_attention"] * cfg.layers
    if "local_rope_theta" in variable:
        c["rope_local_base_freq"] = cfg.local_rope_theta or cfg.rope_theta
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
    for key, name, kind in layer_tensors(cfg):
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
        for key, name, kind in layer_tensors(cfg):
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
