"""How documents become fixed rows for next-token training: their framing and their packing.

Framing: each document is tokenized without special tokens and framed as

    [BOS] text EOS

BOS as the tokenizer's own convention says (`Framing.of`): an HF tokenizer's tokenizer_config
`add_bos_token`, else whether its post-processor prepends BOS (Llama 2 and 3, Gemma do; SmolLM2
and Qwen do not); a sentencepiece model trained here adds none unless `data.framing.bos` asks.
EOS always ends a document: it is the separator of the packed stream, and where the model learns
that text ends. `data.framing.eos` names another token for it (an instruct model's EOS ends chat
turns; its base pretraining ended documents with e.g. SmolLM2's <|endoftext|>).

Packing: the framed documents of a source are concatenated and cut into rows of seq_len + 1
tokens (inputs row[:-1], targets row[1:]); a document longer than a row continues in the next
one. Nothing is padded, so the only tokens lost are the final partial row's. Whether attention
crosses the documents inside a row is the run's `data.packing` (concat | documents), decided on
the device from the EOS tokens of each row (`cpt_jax.update.document_layout`): the rows are the
same for both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

PACKINGS = ("concat", "documents")
BOS_CHOICES = ("auto", "always", "never")


@dataclasses.dataclass(frozen=True)
class Framing:
    """The tokens around each document: BOS before (or None), EOS after."""

    bos_id: int | None
    eos_id: int

    @classmethod
    def of(cls, tokenizer, bos: str = "auto", eos: str = "") -> Framing:
        """The framing `data.framing` asks of `tokenizer`: bos auto (its convention) | always |
        never; eos a token's text, or "" for the tokenizer's EOS. Raises ValueError naming the field."""
        if bos not in BOS_CHOICES:
            raise ValueError(f"data.framing.bos={bos!r} must be one of {', '.join(BOS_CHOICES)}")
        eos_id = tokenizer.eos_id if not eos else tokenizer.token_to_id(eos)
        if eos_id is None:
            raise ValueError(f"data.framing.eos={eos!r} is not a token of the tokenizer")
        add = tokenizer.add_bos if bos == "auto" else bos == "always"
        if add and tokenizer.bos_id is None:
            raise ValueError("data.framing.bos='always', but the tokenizer has no BOS token")
        if add and tokenizer.bos_id == eos_id:
            if bos == "always":
                raise ValueError(f"data.framing.bos='always': BOS and the document end are one token (id {eos_id}),"
                                 f" which already separates documents; set data.framing.bos='never'")
            add = False  # GPT-2 style: the one separator token ends a document and starts the next
        return cls(tokenizer.bos_id if add else None, int(eos_id))

    def suffix(self, tokenizer) -> str:
        """"" for the framing stores were built with before framing was configurable (no BOS, the
        tokenizer's EOS), so their paths stay; else what differs, for the store's path."""
        return ("" if self.bos_id is None else f"-bos{self.bos_id}") + (
            "" if self.eos_id == tokenizer.eos_id else f"-eos{self.eos_id}")


def pack(token_lists: Sequence[Sequence[int] | np.ndarray], seq_len: int, framing: Framing | int) -> np.ndarray:
    """Frame each document (`framing`, or an EOS id: no BOS) and cut the stream into
    non-overlapping rows of ``seq_len + 1`` tokens. The final partial row is dropped.

    Returns int32 [n_rows, seq_len + 1] (n_rows may be 0). The reference for the token store.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    framing = framing if isinstance(framing, Framing) else Framing(None, framing)
    bos = np.array([] if framing.bos_id is None else [framing.bos_id], dtype=np.int32)
    eos = np.array([framing.eos_id], dtype=np.int32)
    parts: list[np.ndarray] = []
    for toks in token_lists:  # loop over documents only; tokens are copied by numpy
        parts += [bos, np.asarray(toks, dtype=np.int32).reshape(-1), eos]
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    width = seq_len + 1
    n_rows = flat.size // width
    return np.ascontiguousarray(flat[: n_rows * width].reshape(n_rows, width))
