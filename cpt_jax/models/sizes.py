"""The size family: all 42 rows of the paper's Table 4, plus tiny sizes for CPU demos and tests.

A size is named by the paper's parameter figure ("1393m"). That figure is 16 L d^2 + 32000 d, a
formula rather than a count of these FFN widths, so each row shows both the paper's figure and
the true parameter count (`python -m cpt_jax.models` prints the table).
"""

from __future__ import annotations

import dataclasses

from cpt_jax.models.llama import ModelConfig

PAPER_VOCAB = 32000


@dataclasses.dataclass(frozen=True)
class Size:
    paper_m: int | None  # the paper's "M" figure; None for sizes that are not in the paper
    hidden: int
    intermediate: int
    heads: int
    layers: int
    kv_heads: int = 0  # 0: as many as heads (LLaMA-2 multi-head attention)
    note: str = ""


# Table 4 of arXiv 2407.02118: M, hidden, intermediate, heads, layers.
_PAPER_ROWS = [
    (49, 512, 3072, 8, 8), (66, 576, 3584, 9, 9), (86, 640, 3584, 10, 10), (105, 640, 3584, 10, 13),
    (125, 640, 3584, 10, 16), (137, 768, 4608, 12, 12), (166, 768, 4608, 12, 15),
    (194, 768, 4608, 12, 18), (208, 896, 5120, 14, 14), (234, 896, 5120, 14, 16),
    (259, 896, 5120, 14, 18), (301, 1024, 5632, 16, 16), (334, 1024, 5632, 16, 18),
    (368, 1024, 5632, 16, 20), (512, 1280, 7168, 10, 18), (591, 1280, 7168, 10, 21),
    (670, 1280, 7168, 10, 24), (616, 1408, 7680, 11, 18), (711, 1408, 7680, 11, 21),
    (806, 1408, 7680, 11, 24), (766, 1536, 8704, 12, 19), (879, 1536, 8704, 12, 22),
    (992, 1536, 8704, 12, 25), (1085, 1792, 9728, 14, 20), (1239, 1792, 9728, 14, 23),
    (1393, 1792, 9728, 14, 26), (1542, 2048, 11264, 16, 22), (1743, 2048, 11264, 16, 25),
    (1944, 2048, 11264, 16, 28), (1736, 2176, 11776, 17, 22), (1963, 2176, 11776, 17, 25),
    (2191, 2176, 11776, 17, 28), (2112, 2304, 12800, 18, 24), (2452, 2304, 12800, 18, 28),
    (2791, 2304, 12800, 18, 32), (2808, 2560, 13824, 20, 26), (3227, 2560, 13824, 20, 30),
    (3647, 2560, 13824, 20, 34), (4016, 2688, 14848, 21, 34), (4248, 2688, 14848, 21, 36),
    (4657, 2816, 15360, 22, 36), (5534, 3072, 16896, 24, 36),
]

SIZES: dict[str, Size] = {
    f"{m}m": Size(m, d, f, h, n, note="paper lists 22 heads; 2688/22 is no integer head size" if m == 4016 else "")
    for m, d, f, h, n in _PAPER_ROWS
}
# Not in the paper: small enough for 2 CPU cores. Dimensions divide the 8-device test meshes.
SIZES.update({
    "nano": Size(None, 32, 96, 2, 2, kv_heads=1),  # the mini sweep's smallest
    "test": Size(None, 64, 128, 4, 2, kv_heads=2),
    "micro": Size(None, 96, 256, 4, 3, kv_heads=2),  # between test and tiny, for the mini sweep
    "tiny": Size(None, 128, 352, 4, 4, kv_heads=2),
    "small": Size(None, 256, 704, 8, 6, kv_heads=4),
})
# Not in the paper: the laptop reproduction's ladder (configs/sweeps/laptop.py): at 260 byte ids,
# N = 6.8k, 12k, 17.6k, 27k, 33k, 43k, 63k, 146k, 283k non-embedding parameters, 42x in all
# (lapKh: half a step above lapK, the cheap sizes that give the fits more sizes).
SIZES.update({
    "lap0": Size(None, 16, 32, 1, 1, kv_heads=1),
    "lap0h": Size(None, 24, 48, 1, 1, kv_heads=1),
    "lap1": Size(None, 32, 64, 2, 1, kv_heads=1),
    "lap1h": Size(None, 32, 64, 2, 2, kv_heads=1),
    "lap2": Size(None, 32, 96, 2, 2, kv_heads=1),
    "lap2h": Size(None, 40, 96, 2, 2, kv_heads=1),
    "lap3": Size(None, 48, 128, 2, 2, kv_heads=1),
    "lap4": Size(None, 64, 160, 4, 3, kv_heads=2),
    "lap5": Size(None, 80, 192, 4, 4, kv_heads=2),
})
# Not in the paper: the two shapes of the PyTorch bar that bench/train_step.py is compared with.
SIZES.update({
    "ref125m": Size(None, 768, 2048, 12, 12, note="PyTorch bar shape (bench/train_step.py)"),
    "ref1100m": Size(None, 2048, 5632, 32, 22, kv_heads=4, note="TinyLlama-1.1B; PyTorch bar shape"),
})


def model_config(size: str, vocab_size: int = PAPER_VOCAB, **overrides) -> ModelConfig:
    """The ModelConfig of a named size; `overrides` set any other ModelConfig field."""
    if size not in SIZES:
        raise ValueError(f"model.size={size!r} is not a known size; known: {', '.join(SIZES)}")
    s = SIZES[size]
    return ModelConfig(
        vocab_size=vocab_size, hidden=s.hidden, intermediate=s.intermediate, layers=s.layers,
        heads=s.heads, kv_heads=s.kv_heads or s.heads, **overrides,
    )


def table(vocab_size: int = PAPER_VOCAB) -> list[dict]:
    """One row per size: the paper's figure and the true parameter count at `vocab_size`."""
    rows = []
    for name, s in SIZES.items():
        cfg = model_config(name, vocab_size)
        rows.append({
            "size": name, "paper_m": s.paper_m, "params": cfg.param_count(),
            "non_embedding": cfg.non_embedding_params(), "hidden": s.hidden,
            "intermediate": s.intermediate, "heads": s.heads, "kv_heads": cfg.kv_heads,
            "layers": s.layers, "head_dim": cfg.head_dim, "note": s.note,
        })
    return rows

