"""Tokenizers behind one interface: sentencepiece models and HF `tokenizer.json` files.

Every tokenizer satisfies `TokenizerLike`: special ids, a 16-hex-char `fingerprint` of its exact
definition (checkpoints and data stores record it, so a run can refuse to resume or evaluate
with a different vocabulary), `encode` without BOS/EOS, `encode_batch`, `decode`, and
`files`/`save` to copy it next to a checkpoint or data store; `load_tokenizer` reads it back
with the same fingerprint.

Tokenizers trained here (`train_tokenizer`) are sentencepiece with fixed special ids
PAD_ID = 0, UNK_ID = 1, BOS_ID = 2, EOS_ID = 3. Byte fallback is on and normalization is off
by default, so any text (rare CJK characters, fullwidth punctuation, repeated spaces)
round-trips exactly without <unk>. `ByteTokenizer` needs no training: the same four special ids,
then one id per UTF-8 byte (260 in all), so every language is cut the same way, a token count is
a byte count and a loss per token is a loss per byte.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import sentencepiece as spm
import tokenizers
from etils import epath

from cpt_jax.storage import atomic_path, parse_json, write_atomic

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

SP_FILE = "tokenizer.model"
BYTES_FILE = "byte_tokenizer.json"
HF_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"

# Special-token names tried in order when tokenizer_config.json does not say. For EOS the
# document separator of base models comes before chat-turn ends (Qwen: <|endoftext|>).
SPECIAL_TOKEN_NAMES: dict[str, tuple[str, ...]] = {
    "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>"),
    "bos": ("<s>", "<|begin_of_text|>", "<bos>"),
    "pad": ("<pad>", "<|pad|>"),
    "unk": ("<unk>",),
}


@runtime_checkable
class TokenizerLike(Protocol):
    vocab_size: int
    pad_id: int | None
    bos_id: int | None
    eos_id: int | None  # packing needs it: HFTokenizer refuses to load without one
    unk_id: int | None
    fingerprint: str
    add_bos: bool  # whether the model expects BOS before a prompt (generation prepends it)

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_to_id(self, token: str) -> int | None:
        """The id of one token given by its text, or None where there is none."""
        ...

    @property
    def files(self) -> dict[str, bytes]:
        """File name -> content: everything `save` writes and `load_tokenizer` reads back."""
        ...

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `files` into directory; returns it, ready for `load_tokenizer`."""
        ...


def load_tokenizer(path: str | os.PathLike) -> TokenizerLike:
    """A sentencepiece `.model` file, a `tokenizer.json` file, a byte tokenizer's file, or a directory
    holding `tokenizer.json` (preferred: HF model folders often carry both), `tokenizer.model` or
    the byte tokenizer's file."""
    path = epath.Path(path)  # local or gs://
    if (path.is_file() and path.name == BYTES_FILE) or (path / BYTES_FILE).is_file():
        return ByteTokenizer.load(path if path.name == BYTES_FILE else path / BYTES_FILE)
    if path.is_file() and path.suffix == ".model":
        return SentencePieceTokenizer.load(path)
    if (path.is_file() and path.name == HF_FILE) or (path / HF_FILE).is_file():
        return HFTokenizer.load(path)
    if (path / SP_FILE).is_file():
        return SentencePieceTokenizer.load(path / SP_FILE)
    state = "is not a tokenizer" if path.exists() else "does not exist"
    raise ValueError(f"{path} {state}: expected a sentencepiece .model file, a {HF_FILE} or {BYTES_FILE} file, "
                     f"or a directory containing one of {HF_FILE}, {SP_FILE}, {BYTES_FILE}")


def _config(text: str, where: str | os.PathLike) -> dict:
    """A tokenizer_config.json's fields; malformed: one ValueError naming it."""
    config = parse_json(text, where)
    if not isinstance(config, dict):
        raise ValueError(f"{where}: not a JSON object")
    return config


def _save_files(directory: str | os.PathLike, files: Mapping[str, bytes]) -> epath.Path:
    for name, content in files.items():
        write_atomic(os.path.join(str(directory), name), content)  # local or gs://
    return epath.Path(directory)


class SentencePieceTokenizer:
    """A sentencepiece model; `add_bos`: the model's convention (a GGUF's add_bos_token, kept in a
    tokenizer_config.json beside the .model), none for one trained here."""

    def __init__(self, model_proto: bytes, add_bos: bool = False, source: str = SP_FILE):
        self._proto = model_proto
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:  # the library's errors do not say which file
            raise ValueError(f"{source}: not a valid sentencepiece model: {str(e).splitlines()[0]}") from None
        self.fingerprint: str = hashlib.sha256(model_proto).hexdigest()[:16]
        self.vocab_size: int = self._sp.get_piece_size()
        # sentencepiece reports a disabled special token as -1.
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (
            i if i >= 0 else None
            for i in (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id(), self._sp.unk_id()))
        self.add_bos = add_bos  # `data.framing.bos` can add one where it is False
        if add_bos and self.bos_id is None:
            raise ValueError("the sentencepiece model has no BOS token, but add_bos_token is true")

    @classmethod
    def load(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        path = epath.Path(path)
        config = path.parent / HF_CONFIG_FILE
        add_bos = bool(_config(config.read_text(), config).get("add_bos_token", False)) if config.is_file() else False
        return cls(path.read_bytes(), add_bos, source=str(path))

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)  # unknown pieces map to <unk>
        return i if self._sp.id_to_piece(i) == token else None

    @property
    def files(self) -> dict[str, bytes]:
        config = {HF_CONFIG_FILE: json.dumps({"add_bos_token": True}).encode()} if self.add_bos else {}
        return {SP_FILE: self._proto, **config}

    def save(self, directory: str | os.PathLike) -> Path:
        return _save_files(directory, self.files)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint})"


# The original name, still used to construct sentencepiece tokenizers directly.
Tokenizer = SentencePieceTokenizer


class HFTokenizer:
    """A HF `tokenizers` tokenizer.json (no `transformers` needed), with special tokens taken
    from an optional tokenizer_config.json, else discovered among the added tokens."""

    def __init__(self, tokenizer_json: str, config_json: str | None = None, source: str = HF_FILE):
        self._json, self._config_json = tokenizer_json, config_json
        try:
            self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # the library's errors do not say which file
            raise ValueError(f"{source}: not a valid {HF_FILE}: {e}") from e
        # Some tokenizer.json files enable truncation (e.g. at 512); it would silently cut documents.
        self._tok.no_truncation()
        self._tok.no_padding()
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        config = _config(config_json, f"{HF_CONFIG_FILE} beside {source}") if config_json is not None else {}
        ids = {role: self._special_id(role, config, source) for role in SPECIAL_TOKEN_NAMES}
        if ids["eos"] is None:
            raise ValueError(f"{source}: no EOS token found: none of the special tokens "
                             f"{list(SPECIAL_TOKEN_NAMES['eos'])} is defined, and no 'eos_token' "
                             f"in a {HF_CONFIG_FILE} next to it")
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = ids["pad"], ids["bos"], ids["eos"], ids["unk"]
        # tokenizer_config.json says, else the post-processor does (Llama 2's adds <s>).
        self.add_bos = bool(config["add_bos_token"]) if "add_bos_token" in config else (
            self.bos_id is not None and self._tok.encode("a").ids[:1] == [self.bos_id])
        # Canonical JSON, so formatting does not matter; plus the chosen special ids, since the
        # same vocabulary with another EOS separates documents differently.
        canonical = json.dumps(json.loads(tokenizer_json), sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False)
        h = hashlib.sha256(canonical.encode())
        h.update(json.dumps(ids, sort_keys=True).encode())
        self.fingerprint: str = h.hexdigest()[:16]

    def _special_id(self, role: str, config: Mapping[str, Any], source: str) -> int | None:
        key = f"{role}_token"
        if key in config:  # an explicit null means the model has none (e.g. Qwen's BOS)
            token = config[key]
            if isinstance(token, dict):
                token = token.get("content")
            if token is None:
                return None
            if not isinstance(token, str):
                raise ValueError(f"{source}: {key}={token!r} from {HF_CONFIG_FILE} is not a token")
            token_id = self._tok.token_to_id(token)
            if token_id is None:
                raise ValueError(f"{source}: {key}={token!r} from {HF_CONFIG_FILE} is not in the vocabulary")
            return token_id
        added = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}
        return next((added[name] for name in SPECIAL_TOKEN_NAMES[role] if name in added), None)

    @classmethod
    def load(cls, path: str | os.PathLike) -> HFTokenizer:
        """A tokenizer.json file or a directory holding one; reads tokenizer_config.json beside it."""
        path = epath.Path(path)
        file = path / HF_FILE if path.is_dir() else path
        config = file.parent / HF_CONFIG_FILE
        return cls(file.read_text(encoding="utf-8"),
                   config.read_text(encoding="utf-8") if config.is_file() else None, source=str(file))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # Parallel in Rust; the _fast variant skips computing offsets, which are not needed.
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        # Special tokens are dropped, as sentencepiece does for BOS/EOS.
        return self._tok.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def files(self) -> dict[str, bytes]:
        files = {HF_FILE: self._json.encode()}
        if self._config_json is not None:
            files[HF_CONFIG_FILE] = self._config_json.encode()
        return files

    def save(self, directory: str | os.PathLike) -> Path:
        return _save_files(directory, self.files)

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, fingerprint={self.fingerprint})"


class ByteTokenizer:
    """UTF-8 bytes: PAD_ID, UNK_ID, BOS_ID, EOS_ID, then byte b as id b + OFFSET."""

    OFFSET = 4
    vocab_size = OFFSET + 256
    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID
    add_bos = False
    _DEFINITION = json.dumps({"type": "utf8_bytes", "offset": OFFSET}).encode()
    fingerprint = hashlib.sha256(_DEFINITION).hexdigest()[:16]

    @classmethod
    def load(cls, path: str | os.PathLike) -> ByteTokenizer:
        if epath.Path(path).read_bytes() != cls._DEFINITION:
            raise ValueError(f"{path}: not this version's byte tokenizer (expected {cls._DEFINITION.decode()})")
        return cls()

    def encode(self, text: str) -> list[int]:
        return (np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self.OFFSET).tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        # Special ids are dropped, as the other tokenizers do; a cut character decodes as U+FFFD.
        return bytes(i - self.OFFSET for i in map(int, ids) if i >= self.OFFSET).decode("utf-8", "replace")

    def token_to_id(self, token: str) -> int | None:
        raw = token.encode("utf-8")
        return raw[0] + self.OFFSET if len(raw) == 1 else None

    @property
    def files(self) -> dict[str, bytes]:
        return {BYTES_FILE: self._DEFINITION}

    def save(self, directory: str | os.PathLike) -> Path:
        return _save_files(directory, self.files)

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint})"


MODEL_TYPES = ("bpe", "unigram", "bytes")  # data.tokenizer.model_type: sentencepiece's two, or ByteTokenizer


def made_vocab_size(model_type: str, vocab_size: int) -> int:
    """The vocabulary of the tokenizer a run makes itself (no data.tokenizer.path), before it is made."""
    return ByteTokenizer.vocab_size if model_type == "bytes" else vocab_size


def train_tokenizer(
    texts: Iterable[str],
    path: str | os.PathLike,
    vocab_size: int,
    model_type: str = "bpe",  # ~10x faster to train than unigram here; LLaMA-style
    num_threads: int = 2,
    character_coverage: float = 0.9995,  # keep nearly all CJK chars; the rarest go to bytes
    byte_fallback: bool = True,
) -> SentencePieceTokenizer:
    """Train a sentencepiece model on an in-memory iterator of lines (keep each line < 4 KB:
    longer ones are skipped by sentencepiece) and write it atomically to path.

    Deterministic for the same input and options: no sampling (input_sentence_size=0), and the
    model is returned via model_writer, so no file name ends up inside the proto (which would
    change the fingerprint).
    """
    if model_type not in ("bpe", "unigram"):  # "bytes" is not trained
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=buf,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            # Lossless: the default NFKC rule would turn the fullwidth "，" into ",".
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            num_threads=num_threads,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            train_extremely_large_corpus=False,
            minloglevel=2,  # quiet
        )
    except RuntimeError as e:
        if "required_chars" in str(e):  # CJK needs ~2.6k chars (+ 256 bytes with byte fallback) + specials
            raise ValueError(f"vocab_size={vocab_size} is too small for this corpus: {e}") from e
        if "too high" in str(e):  # a small corpus has fewer distinct pieces than asked for
            raise ValueError(f"vocab_size={vocab_size} is too large for this corpus: {e}") from e
        raise
    proto = buf.getvalue()
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(proto)
    return SentencePieceTokenizer(proto)
