"""The harness tasks cpt_jax names: the paper's zero-shot suite as one group, an offline
multiple-choice task made of the bundled Bibles' held-out chapters, and passkey retrieval.

- `cpt_paper`: the English and Chinese subsets the harness has of the paper's suite (Table 6):
  XNLI, XWinograd and XStoryCloze en/zh, XCOPA zh (XCOPA has no English: COPA, its source, stands
  in), HellaSwag en (the harness has no Chinese HellaSwag; the paper's XHellaSwag is its own
  translation) and PIQA. Their datasets come from the HF hub: usable wherever the harness can
  reach it, not on this project's offline CI.
- `bible_next_verse` (`_en`, `_zh`): given three verses of a held-out chapter (the eval split the
  runs' eval losses use), choose the verse that follows among four verses of that chapter (the
  other three drawn at random, seeded by chapter and verse). Chance is 25%.
- `cpt_passkey` (long context; Mohtashami and Jaggi 2023): a five-digit key hidden at a depth of 0,
  25, 50, 75 or 100% of filler text ("The grass is green. ..."), then "What is the pass key? The
  pass key is"; `acc` is 1 where the key is the model's greedy continuation (every digit the
  argmax), `perplexity` that of the key. One task per length in characters (1k to 32k: about 250
  to 8k tokens of an English BPE) and depth, `cpt_passkey_<length>_d<depth>`, grouped by length
  (`cpt_passkey_<length>`) and all together (`cpt_passkey`; the harness's own `passkey` is
  another task); 10 keys each. A context longer than the
  scorer's `max_length` is cut on the left, as the harness's HF backend cuts it.

The task files (YAML and JSONL) are written into the cache on first use.

`resolve` checks names, and the local datasets they read, before anything is loaded.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cpt_jax.data.corpora import default_cache_dir, load_bible, split_documents
from cpt_jax.storage import atomic_path, exclusive

PAPER_SUITE = ("xnli_en", "xnli_zh", "xwinograd_en", "xwinograd_zh", "xstorycloze_en", "xstorycloze_zh",
               "xcopa_zh", "copa", "hellaswag", "piqa")
BIBLE_LANGUAGES = {"en": " ", "zh": ""}  # language -> what joins its verses
CONTEXT_VERSES, CHOICES = 3, 4
PASSKEY_LENGTHS = {"1k": 1_000, "2k": 2_000, "4k": 4_000, "8k": 8_000, "16k": 16_000, "32k": 32_000}  # characters
PASSKEY_DEPTHS = (0, 25, 50, 75, 100)  # % of the filler before the key
PASSKEY_KEYS = 10  # per length and depth
VERSION = 3  # of the task files: a change writes them anew
# Seeds the documents' random choices (distractors, keys), apart from VERSION: the questions stay
# the ones every earlier run was scored on whenever the files are written anew.
SEED = 1


def bible_next_verse(language: str) -> list[dict]:
    """The task's documents for one language: context, four choices, the index of the true one."""
    join = BIBLE_LANGUAGES[language]
    _, held_out = split_documents(load_bible(default_cache_dir())[language])
    docs = []
    for c, chapter in enumerate(held_out):
        verses = [v.strip() for v in chapter.verses]
        for i in range(CONTEXT_VERSES, len(verses)):
            # Distractors: the chapter's other verses, each text once and none equal to the answer.
            others = list({verses[j]: j for j in range(len(verses)) if verses[j] != verses[i]}.values())
            if len(others) < CHOICES - 1:
                continue
            rng = np.random.default_rng([SEED, c, i])
            picked = [i, *rng.choice(others, CHOICES - 1, replace=False).tolist()]
            rng.shuffle(picked)
            docs.append({"context": join.join(verses[i - CONTEXT_VERSES:i]), "choices": [verses[j] for j in picked],
                         "gold": picked.index(i), "chapter": c, "verse": i})
    return docs


def passkey(length: int, depth: int) -> list[dict]:
    """The passkey task's documents at `length` characters with the key at `depth` % of the filler."""
    intro = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
             "I will quiz you about the important information there.")
    filler = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    question = " What is the pass key? The pass key is"
    docs = []
    for i in range(PASSKEY_KEYS):
        key = int(np.random.default_rng([SEED, length, depth, i]).integers(10_000, 100_000))
        needle = f" The pass key is {key}. Remember it. {key} is the pass key."
        n = max(0, (length - len(intro) - len(needle) - len(question)) // len(filler))
        before = round(n * depth / 100)
        context = intro + filler * before + needle + filler * (n - before) + question
        docs.append({"context": context, "target": f" {key}", "depth": depth, "length": len(context)})
    return docs


def _passkey_files(root: Path) -> dict[str, dict]:
    """The passkey tasks' YAML by file name (their data written beside them), and their groups."""
    files, lengths = {}, []
    for label, length in PASSKEY_LENGTHS.items():
        tasks = []
        for depth in PASSKEY_DEPTHS:
            name = f"cpt_passkey_{label}_d{depth}"
            files[f"{name}.yaml"] = _local_task(
                root, name, passkey(length, depth), output_type="loglikelihood", doc_to_target="{{target}}",
                target_delimiter="", metrics={"acc": ("mean", True), "perplexity": ("perplexity", False)})
            tasks.append(name)
        files[f"cpt_passkey_{label}.yaml"] = _group_yaml(f"cpt_passkey_{label}", tasks)
        lengths.append(f"cpt_passkey_{label}")
    files["cpt_passkey.yaml"] = _group_yaml("cpt_passkey", lengths)
    return files


def _local_task(root: Path, name: str, docs: list[dict], metrics: dict[str, tuple[str, bool]], **spec) -> dict:
    """Writes `docs` to root/name.jsonl and returns the harness task over it: the context is each
    document's "context", `spec` the rest (output type, target, ...), `metrics` {metric:
    (aggregation, higher is better)}."""
    data = root / f"{name}.jsonl"
    with atomic_path(data) as tmp:
        tmp.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "doc_to_text": "{{context}}", **spec,
            "metric_list": [{"metric": metric, "aggregation": agg, "higher_is_better": up}
                            for metric, (agg, up) in metrics.items()],
            "metadata": {"version": VERSION}}


def _group_yaml(name: str, tasks: Sequence[str]) -> dict:
    return {"group": name, "task": list(tasks),
            "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": False}]}


def task_dir() -> Path:
    """The dir of cpt_jax's task files (YAML is JSON), written once into the cache."""
    root = default_cache_dir() / "eval_tasks" / f"v{VERSION}"
    done = root / "done"
    if not done.exists():
        with exclusive(root):
            if not done.exists():
                root.mkdir(parents=True, exist_ok=True)
                files = {"cpt_paper.yaml": _group_yaml("cpt_paper", PAPER_SUITE),
                         "bible_next_verse.yaml": _group_yaml(
                             "bible_next_verse", [f"bible_next_verse_{lang}" for lang in BIBLE_LANGUAGES])}
                for lang in BIBLE_LANGUAGES:
                    files[f"bible_next_verse_{lang}.yaml"] = _local_task(
                        root, f"bible_next_verse_{lang}", bible_next_verse(lang), output_type="multiple_choice",
                        doc_to_choice="{{choices}}", doc_to_target="{{gold}}", target_delimiter=BIBLE_LANGUAGES[lang],
                        metrics={"acc": ("mean", True), "acc_norm": ("mean", True)})
                files |= _passkey_files(root)
                for name, content in files.items():
                    with atomic_path(root / name) as tmp:
                        tmp.write_text(json.dumps(content, indent=1, ensure_ascii=False))
                done.touch()
    return root


@functools.cache
def manager(include_path: str | None = None):
    """The harness's TaskManager with cpt_jax's tasks (and `include_path`'s) beside its own
    (built once: indexing the harness's thousands of tasks takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(task_dir())] + ([include_path] if include_path else []), verbosity="ERROR")


def resolve(names: Sequence[str], include_path: str | None = None) -> list[str]:
    """`names` (tasks or groups) checked: each is known to the harness, and every local file its
    tasks read exists. Raises ValueError naming the first that is not."""
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError("--tasks is empty: name at least one task or group")
    tm = manager(include_path)
    for name in names:
        if name not in tm.task_index:
            near = sorted(n for n in tm.all_tasks if n.startswith(name.split("_")[0]))[:8]
            raise ValueError(f"task {name!r} is not a harness task or group" +
                             (f"; similar: {', '.join(near)}" if near else "") +
                             "; cpt_jax's own: bible_next_verse (_en, _zh), cpt_paper, cpt_passkey (_1k ... _32k, "
                             "_<length>_d<depth>)")
        for task in _leaves(tm, name):
            cfg = tm.task_index[task].cfg or {}
            files = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
            for path in files.values() if isinstance(files, dict) else [files]:
                for p in [path] if isinstance(path, str) else path:
                    if not Path(p).exists():
                        raise ValueError(f"task {task!r}: its dataset file {p} does not exist")
    return names


def _leaves(tm, name: str) -> list[str]:
    """The tasks under a group (recursively), or [name] for a task."""
    entry = tm.task_index[name]
    if entry.kind.name != "GROUP":
        return [name]
    subtasks = (entry.cfg or {}).get("task") or []
    return [t for sub in subtasks if isinstance(sub, str) and sub in tm.task_index for t in _leaves(tm, sub)]
