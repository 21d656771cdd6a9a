"""The languages study (a sweep with `targets`): how much pretraining on the source language is
worth to each target, and whether that follows the paper's order (French > Russian > Chinese).

Per target language and size, from the final evals of its scratch and CPT cooldown branches:
- effective data transferred (Hernandez et al. 2021, "Scaling Laws for Transfer"): D_T, the tokens
  scratch would need beyond CPT's to reach CPT's loss, as a fraction of CPT's tokens,
  D_T / D_cpt = D_scratch(L_cpt) / D_cpt - 1, at each CPT budget; where CPT's loss is below every
  scratch point it is a lower bound (scratch's most tokens);
- savings at equal loss (findings.savings): the share of scratch's tokens CPT saves reaching
  scratch's final loss.
Intervals come from draws of the seed noise the sweep measures (its seed study), pooled over the
targets. Similarity to the source: the share of the target's UTF-8 bytes, and of its byte
trigrams (occurrences in its training text), that also occur in the source's training text.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence

import ml_collections
import numpy as np

from cpt_jax.data import pipeline
from cpt_jax.data import sources as src_lib
from cpt_jax.scaling import findings

BOUND = {"at": "", "bound": ">= ", "ahead": "<= "}  # how a D_T / D_cpt is known, as text


def ngram_overlap(source: Iterable[str], target: Iterable[str], n: int = 3) -> float:
    """The share of the target texts' byte n-gram occurrences whose n-gram occurs in the source texts."""
    def grams(texts: Iterable[str]) -> collections.Counter:
        counts: collections.Counter = collections.Counter()
        for text in texts:
            raw = text.encode("utf-8")
            counts.update(raw[i:i + n] for i in range(len(raw) - n + 1))
        return counts

    seen, wanted = grams(source), grams(target)
    total = sum(wanted.values())
    return sum(c for g, c in wanted.items() if g in seen) / total if total else 0.0


NGRAMS = {"bytes": 1, "byte trigrams": 3}  # shared bytes: shared script, spaces, punctuation; trigrams: spelling


def similarities(data: ml_collections.ConfigDict, source: str, targets: Sequence[str]) -> dict[str, dict[str, float]]:
    """ngram_overlap of each target's training split with the source's, per NGRAMS (the splits prepared)."""
    specs, root = pipeline.source_specs(data), pipeline.data_dir(data)

    def texts(name: str) -> list[str]:
        split = src_lib.open_split(specs[name], "train", root)
        return split.texts(0, len(split))

    english = texts(source)
    return {lang: {name: ngram_overlap(english, other, n) for name, n in NGRAMS.items()}
            for lang in targets for other in [texts(lang)]}


def transferred(scratch: tuple, cpt: tuple) -> list[dict]:
    """Per CPT point (tokens, loss): D_T / D_cpt, with "how": "at" (scratch's points bracket CPT's
    loss), "bound" (below every scratch point: at least this) or "ahead" (CPT's loss is above
    scratch's first point: scratch needs fewer tokens than its first, so at most this)."""
    d_s, l_s = (np.asarray(x, float) for x in scratch)
    out = []
    for d_c, l_c in sorted(zip(*(np.asarray(x, float) for x in cpt))):
        d_needed, how = findings.tokens_to_reach(d_s, l_s, l_c)
        if how == "never":
            d_needed, how = float(d_s.max()), "bound"
        elif how == "below":
            how = "ahead"
        out.append({"tokens_cpt": float(d_c), "loss_cpt": float(l_c), "tokens_scratch": d_needed,
                    "fraction": d_needed / d_c - 1, "how": how})
    return out


def _moved(points: tuple, sigma: float, rng: np.random.Generator) -> tuple:
    d, v = points
    return d, np.asarray(v, float) * np.exp(sigma * rng.standard_normal(len(v)))


def per_language(scratch: dict[str, dict[int, tuple]], cpt: dict[str, dict[int, tuple]],
                 noise: dict[str, float], n: int = 1000, level: float = 0.95) -> dict[str, dict[int, dict]]:
    """lang -> N -> {"transfer": [rows of `transferred`, each with an "interval"], "saved": the saving
    at scratch's final loss, "saved_interval"}; intervals over n draws of the seed noise."""
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    rng = np.random.default_rng(0)
    out: dict[str, dict[int, dict]] = {}
    for lang in scratch:
        for size in sorted(scratch[lang]):
            if size not in cpt.get(lang, {}):
                continue
            s, c = scratch[lang][size], cpt[lang][size]
            rows = transferred(s, c)
            saved = findings.savings({size: s}, {size: c})[size][-1]
            draws = [(transferred(_moved(s, noise.get("scratch", 0.0), rng), _moved(c, noise.get("cpt", 0.0), rng)),
                      findings.savings({size: _moved(s, noise.get("scratch", 0.0), rng)},
                                       {size: _moved(c, noise.get("cpt", 0.0), rng)})[size][-1]["saved"])
                     for _ in range(n if noise else 0)]
            for i, row in enumerate(rows):
                row["interval"] = tuple(np.percentile([d[0][i]["fraction"] for d in draws] or [row["fraction"]], q))
                row["draws"] = [(d[0][i]["fraction"], d[0][i]["how"]) for d in draws] or [(row["fraction"], row["how"])]
            out.setdefault(lang, {})[size] = {
                "transfer": rows, "saved": saved["saved"], "saved_how": saved["how"],
                "saved_interval": tuple(np.percentile([d[1] for d in draws] or [saved["saved"]], q))}
    return out


def order(study: dict[str, dict[int, dict]], expected: Sequence[str], level: float = 0.95) -> findings.Verdict:
    """The paper's order of `expected` languages (most transfer first), judged at the largest size
    on D_T / D_cpt at CPT's smallest budget: holds if every consecutive difference's interval (over
    the same draws) lies above 0, does not hold if one lies below 0, else undetermined."""
    missing = [lang for lang in expected if lang not in study]
    rule = ("Rule: at the largest size, D_T / D_cpt at CPT's smallest budget; holds if each consecutive "
            "difference's 95% interval lies above 0, does not hold if one lies below 0, else undetermined (also "
            "where a bound, CPT's loss outside scratch's points, leaves the difference's side open).")
    if missing:
        return findings.Verdict("language_order", findings.UNDETERMINED, (f"not judged: no runs of {missing}", rule),
                                ours="not judged")
    size = max(set.intersection(*(set(study[lang]) for lang in expected)))
    first = {lang: study[lang][size]["transfer"][0] for lang in expected}
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    statuses, lines = [], [f"N={size:,}, D_T / D_cpt at {first[expected[0]]['tokens_cpt']:,.0f} CPT tokens: "
                           + ", ".join(f"{lang} {BOUND[first[lang]['how']]}{first[lang]['fraction']:+.2f} "
                                       f"[{first[lang]['interval'][0]:+.2f}, {first[lang]['interval'][1]:+.2f}]"
                                       for lang in expected)]
    for a, b in zip(expected, expected[1:]):
        (fa, how_a), (fb, how_b) = (list(zip(*first[x]["draws"])) for x in (a, b))
        diff = np.asarray(fa) - np.asarray(fb)
        lo, hi = np.percentile(diff, q)
        # A bound makes the difference a bound: "bound" (at least) on a or "ahead" (at most) on b
        # keep it a lower bound, the reverse an upper bound; a verdict needs the bound it rests on.
        lower = all(x != "ahead" for x in how_a) and all(x != "bound" for x in how_b)
        upper = all(x != "bound" for x in how_a) and all(x != "ahead" for x in how_b)
        status = (findings.HOLDS if lo > 0 and lower else findings.FAILS if hi < 0 and upper
                  else findings.UNDETERMINED)
        statuses.append(status)
        lines.append(f"{a} - {b}: {first[a]['fraction'] - first[b]['fraction']:+.2f}, 95% interval "
                     f"[{lo:+.2f}, {hi:+.2f}] ({status})")
    lines.append(rule)
    ranked = sorted(study, key=lambda lang: -study[lang][size]["transfer"][0]["fraction"])
    return findings.Verdict("language_order", findings.combine(*statuses), tuple(lines),
                            {"size": size, "ranked": ranked}, "order measured: " + " > ".join(ranked))
