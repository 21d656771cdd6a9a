"""Downstream evaluation: cpt_jax's harness backend (cpt_jax/harness.py) against the harness's own
HF backend (an independent implementation, on CPU torch) on the same checkpoint exported to HF;
batching; a scorer compiled once for any params; the `python -m cpt_jax.evaluate` command and its
bad input before any model is loaded."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import tokenizers
import transformers
from tokenizers import Tokenizer, pre_tokenizers, processors

from cpt_jax import checks, checkpoint, convert, harness, inference, trainer
from cpt_jax import models as cpt_models
from cpt_jax import tasks as task_lib
from cpt_jax.errors import ConfigError
from cpt_jax.evaluate import main as evaluate_main
from cpt_jax.harness import make_lm
from cpt_jax.rundir import RunDir

from helpers import COMMON, comparable, randomised, small_config

lm_eval = pytest.importorskip("lm_eval")  # the [eval] extra
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

VOCAB = 300
BOS, EOS = 1, 2


def byte_level_with_bos() -> str:
    """A byte-level tokenizer.json (every byte a token) whose post-processor prepends <s>, as
    Llama's does: the BOS convention the harness must follow."""
    vocab = {"<unk>": 0, "<s>": BOS, "</s>": EOS}
    # sorted: alphabet() comes in another order in each process, and so would the token ids
    vocab |= {c: 3 + i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(tokenizers.models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return tok.to_str()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(a converted checkpoint of a random transformers Llama, the same exported back to HF, the
    transformers model as transformers saved it)."""
    root = tmp_path_factory.mktemp("eval")
    config = transformers.LlamaConfig(**{**COMMON, "vocab_size": VOCAB}, rope_theta=5000.0, bos_token_id=BOS,
                                      eos_token_id=EOS)
    ref = randomised(transformers.LlamaForCausalLM, config)
    ref.save_pretrained(root / "hf")
    (root / "hf" / "tokenizer.json").write_text(byte_level_with_bos())
    (root / "hf" / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}))
    convert.import_model(str(root / "hf"), str(root / "ckpt"))
    convert.export_model(str(root / "ckpt"), str(root / "exported"))
    return str(root / "ckpt"), str(root / "exported"), str(root / "hf")


def hf_backend(hf_dir: str) -> HFLM:
    return HFLM(pretrained=hf_dir, batch_size=8, device="cpu", dtype="float32", max_length=512)


@pytest.fixture(scope="module")
def both(exported):
    """(our harness backend on the checkpoint, the harness's HF backend on its export)."""
    model, tok = inference.load(exported[0])
    return make_lm(model, tok, batch_size=8, max_length=512), hf_backend(exported[1])


def requests() -> list[tuple[str, str]]:
    """Real text of mixed lengths: Bible next-verse pairs in both languages, and an empty context."""
    pairs = []
    for lang in ("en", "zh"):
        for d in task_lib.bible_next_verse(lang)[:5]:
            pairs += [(d["context"], task_lib.BIBLE_LANGUAGES[lang] + c) for c in d["choices"]]
    return pairs + [("", "In the beginning")]


@pytest.mark.parametrize("reference", ["our_export", "transformers_saved"])
def test_loglikelihoods_equal_the_harness_hf_backend(both, exported, reference):
    """The HF backend on our export of the checkpoint, and on the model as transformers saved it
    (save_pretrained) before we imported it: no file of ours in between."""
    ours, theirs = both[0], both[1] if reference == "our_export" else hf_backend(exported[2])
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(requests())]
    got, want = ours.loglikelihood(reqs, disable_tqdm=True), theirs.loglikelihood(reqs, disable_tqdm=True)
    # 1e-4, and past |log p| ~ 1000 (a long Chinese verse under a random model) float32's own
    # resolution of the HF backend's sum (1.2e-4 at 1000): rtol 1e-6.
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=1e-4, rtol=1e-6)
    assert [g[1] for g in got] == [w[1] for w in want]
    text = [Instance("loglikelihood_rolling", {}, (c + x,), i) for i, (c, x) in enumerate(requests()[::7])]
    # Whole texts: sums of hundreds of token log-probs, which the HF backend accumulates in float32
    # (we sum in float64): the same tolerance.
    np.testing.assert_allclose(ours.loglikelihood_rolling(text, disable_tqdm=True),
                               theirs.loglikelihood_rolling(text, disable_tqdm=True), atol=1e-4, rtol=1e-6)


def test_batching_and_padding_change_no_loglikelihood(exported):
    model, tok = inference.load(exported[0])
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(requests())]
    batched = make_lm(model, tok, batch_size=16).loglikelihood(reqs, disable_tqdm=True)
    alone = [make_lm(model, tok, batch_size=8).loglikelihood([r], disable_tqdm=True)[0] for r in reqs[::5]]
    np.testing.assert_allclose([b[0] for b in batched[::5]], [a[0] for a in alone], atol=1e-5, rtol=0)


def test_scorer_compiles_once_for_any_params(exported):
    """The in-loop use: one Scorer per run, a second evaluation with other params compiles nothing
    (no trace, no XLA compile) and scores as a fresh scorer does."""
    model, tok = inference.load(exported[0])
    spec, params = cpt_models.spec(model.cfg), cpt_models.params_of(model)
    other = jax.tree.map(lambda p: p * 0.9, params)
    scorer = harness.Scorer(spec, tok, batch_size=8, max_length=512)
    compiles = []

    def listen(event: str, *args, **kwargs) -> None:
        if event.startswith("/jax/core/compile/"):
            compiles.append(event)

    def evaluate(s: harness.Scorer, p: dict) -> list:
        results = s.evaluate(p, ["bible_next_verse_en"], limit=4, log_samples=True)
        return [sample["resps"] for sample in results["samples"]["bible_next_verse_en"]]

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        first = evaluate(scorer, params)
        n_first = len(compiles)
        second = evaluate(scorer, other)
        n_second = len(compiles) - n_first
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert n_first > 0 and n_second == 0, compiles
    assert second != first  # the new params were used
    assert second == evaluate(harness.Scorer(spec, tok, batch_size=8, max_length=512), other)


def generate_task(directory) -> str:
    """A generate_until task over local files: the first words of a verse, then up to its end."""
    docs = [{"prompt": d["context"], "answer": d["choices"][d["gold"]]} for d in task_lib.bible_next_verse("en")[:6]]
    data = directory / "gen.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (directory / "gen.yaml").write_text(json.dumps({
        "task": "verse_gen", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}", "generation_kwargs": {"until": ["."], "max_gen_toks": 12, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}))
    return str(directory)


def test_task_accuracies_and_generations_equal_the_harness_hf_backend(both, exported, tmp_path):
    ours, theirs = both
    include = generate_task(tmp_path)
    manager = task_lib.manager(include)
    results = {}
    for name, lm in (("ours", ours), ("theirs", theirs)):
        results[name] = lm_eval.simple_evaluate(model=lm, tasks=["bible_next_verse_en", "verse_gen"], limit=6,
                                                task_manager=manager, log_samples=True, bootstrap_iters=0)
    for task in ("bible_next_verse_en", "verse_gen"):
        for metric in ("acc,none", "acc_norm,none", "exact_match,none"):
            if metric in results["theirs"]["results"][task]:
                assert results["ours"]["results"][task][metric] == results["theirs"]["results"][task][metric]
    generated = [[s["filtered_resps"] for s in results[n]["samples"]["verse_gen"]] for n in ("ours", "theirs")]
    assert generated[0] == generated[1] and any(r[0] for r in generated[0])


def test_passkey_scores_equal_the_harness_hf_backend(both):
    """Passkey contexts of 1k characters (over 512 byte tokens: both backends cut them on the left)
    with the key in the middle and at the end: each key's log-likelihood, whether it is the greedy
    continuation, and the tasks' acc and perplexity."""
    names = ["cpt_passkey_1k_d50", "cpt_passkey_1k_d100"]
    results = {name: lm_eval.simple_evaluate(model=lm, tasks=names, limit=3, task_manager=task_lib.manager(),
                                             log_samples=True, bootstrap_iters=0)
               for name, lm in zip(("ours", "theirs"), both)}
    for task in names:
        got, want = (results[n]["results"][task] for n in ("ours", "theirs"))
        assert got["acc,none"] == want["acc,none"]
        np.testing.assert_allclose(got["perplexity,none"], want["perplexity,none"], rtol=1e-5)
        got, want = ([s["resps"][0][0] for s in results[n]["samples"][task]] for n in ("ours", "theirs"))
        np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=1e-4, rtol=1e-6)
        assert [g[1] for g in got] == [w[1] for w in want]


def test_generate_until_honours_the_tasks_sampling_and_stop_sequences(both):
    """A request's do_sample, temperature, top_k, top_p and `until` as the HF backend takes them. At
    temperature 5 a random model's draws leave the greedy path; top_k=1 or a tiny top_p bring
    them back to it, in both backends. An `until` string taken from the greedy text cuts both there."""
    ours, theirs = both
    contexts = [d["context"] for d in task_lib.bible_next_verse("en")[:3]]

    def generate(lm, **kwargs) -> list[str]:
        reqs = [Instance("generate_until", {}, (c, {"max_gen_toks": 16, **kwargs}), i) for i, c in enumerate(contexts)]
        return lm.generate_until(reqs, disable_tqdm=True)

    greedy = generate(ours, do_sample=False)
    assert greedy == generate(theirs, do_sample=False) and all(len(g) > 6 for g in greedy)
    assert generate(ours, do_sample=True, temperature=5.0) != greedy  # sampling is on
    for kwargs in ({"top_k": 1}, {"top_p": 1e-6}):
        got = generate(ours, do_sample=True, temperature=5.0, **kwargs)
        assert got == greedy == generate(theirs, do_sample=True, temperature=5.0, **kwargs), kwargs
    row = max(range(len(greedy)), key=lambda r: len(greedy[r]))
    text = greedy[row]
    at = next(k for k in range(2, len(text) - 1) if text.index(text[k:k + 2]) == k)  # first seen there
    cut = generate(ours, do_sample=False, until=[text[at:at + 2], "\n\n"])
    assert cut == generate(theirs, do_sample=False, until=[text[at:at + 2], "\n\n"])
    assert cut[row] == text[:at]
    with pytest.raises(ValueError, match=r"generation_kwargs \['num_beams'\] are not supported"):
        generate(ours, do_sample=False, num_beams=2)


def test_evaluate_command_writes_results(both, exported, tmp_path, capsys):
    assert evaluate_main(["--workdir", exported[0], "--tasks", "bible_next_verse_zh", "--limit", "8",
                          "--batch_size", "8", "--output", str(tmp_path / "out")]) == 0
    got = json.loads((tmp_path / "out" / "results.json").read_text())["results"]["bible_next_verse_zh"]
    want = lm_eval.simple_evaluate(model=both[1], tasks=["bible_next_verse_zh"], limit=8,
                                   task_manager=task_lib.manager(), bootstrap_iters=0)["results"]["bible_next_verse_zh"]
    assert (got["acc,none"], got["acc_norm,none"]) == (want["acc,none"], want["acc_norm,none"])
    assert f"bible_next_verse_zh: acc {want['acc,none']:.4f}, acc_norm {want['acc_norm,none']:.4f}" in (
        capsys.readouterr().out)


def perplexity_task(directory) -> str:
    """A loglikelihood_rolling task over local files (Bible verses): bits per byte, which any
    change of the params moves (an accuracy may not)."""
    data = directory / "ppl.jsonl"
    data.write_text("".join(json.dumps({"text": d["context"]}) + "\n" for d in task_lib.bible_next_verse("en")[:4]))
    (directory / "ppl.yaml").write_text(json.dumps({
        "task": "verse_ppl", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "bits_per_byte"}]}))
    return str(directory)


def test_evaluate_step_scores_that_checkpoint_not_the_latest(both, exported, tmp_path):
    """--step 0 of a workdir whose latest step, 3, holds other params scores step 0: as the HF
    backend scores step 0's export; without --step, step 3."""
    run = tmp_path / "run"
    shutil.copytree(exported[0], run)
    model, _ = inference.load(str(run))
    ckpt = checkpoint.Checkpointer(RunDir.of(str(run)).checkpoints, async_save=False)
    ckpt.save(3, jax.tree.map(lambda p: np.asarray(p) * 2.0, cpt_models.params_of(model)), None, ckpt.meta(0))
    ckpt.close()
    include = perplexity_task(tmp_path)
    args = ["--workdir", str(run), "--tasks", "verse_ppl", "--include_path", include, "--batch_size", "8"]
    assert evaluate_main([*args, "--step", "0"]) == 0 and evaluate_main(args) == 0
    got = {}
    for step in (0, 3):
        results = json.loads((run / "eval" / f"step_{step}" / "results.json").read_text())["results"]
        got[step] = results["verse_ppl"]["bits_per_byte,none"]
    want = lm_eval.simple_evaluate(model=both[1], tasks=["verse_ppl"], task_manager=task_lib.manager(include),
                                   bootstrap_iters=0)["results"]["verse_ppl"]["bits_per_byte,none"]
    # Each verse's ~450 token log-probs (~2,800 nats) are summed in float32 by the HF backend: a
    # few 1e-6 of the sum (4.4e-6 seen with other token ids), 2e-5 were every rounding one way.
    assert got[0] == pytest.approx(want, rel=1e-5) and got[3] != pytest.approx(want, rel=1e-2)


def test_unknown_task_or_missing_dataset_fails_before_any_model_is_loaded(tmp_path, capsys):
    # The workdir does not exist: the error is the task's, so tasks were checked first.
    assert evaluate_main(["--workdir", str(tmp_path / "nowhere"), "--tasks", "bible_next_vers"]) == 2
    assert "evaluate error: task 'bible_next_vers' is not a harness task" in capsys.readouterr().err
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mine.yaml").write_text(json.dumps({
        "task": "mine", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tmp_path / "gone.jsonl")}},
        "output_type": "multiple_choice", "test_split": "test", "doc_to_text": "{{q}}", "doc_to_choice": "{{c}}",
        "doc_to_target": "{{a}}"}))
    assert evaluate_main(["--workdir", str(tmp_path / "nowhere"), "--tasks", "mine",
                          "--include_path", str(tmp_path / "tasks")]) == 2
    assert f"task 'mine': its dataset file {tmp_path / 'gone.jsonl'} does not exist" in capsys.readouterr().err


def test_bible_next_verse_is_real_and_seeded(monkeypatch):
    for lang in ("en", "zh"):
        docs = task_lib.bible_next_verse(lang)
        assert len(docs) > 500 and docs == task_lib.bible_next_verse(lang)
        with monkeypatch.context() as m:  # new task files (another passkey, say) keep the questions
            m.setattr(task_lib, "VERSION", task_lib.VERSION + 1)
            assert task_lib.bible_next_verse(lang) == docs
        golds = np.bincount([d["gold"] for d in docs], minlength=4) / len(docs)
        assert golds.min() > 0.15  # the true verse is not always in one place
        assert all(len(set(d["choices"])) == 4 for d in docs)


def test_paper_suite_is_one_group_of_harness_tasks():
    tm = task_lib.manager()
    assert task_lib.resolve(["cpt_paper"]) == ["cpt_paper"]
    assert set(task_lib._leaves(tm, "cpt_paper")) == set(task_lib.PAPER_SUITE)
    assert os.path.isfile(task_lib.task_dir() / "cpt_paper.yaml")


@pytest.mark.slow  # two short training runs with the harness in their loops
def test_in_loop_task_metrics_at_their_steps_and_through_resume(tmp_path):
    config = small_config("--config.total_steps=4", "--config.checkpoint_every=2", "--config.eval_every=2",
                          "--config.eval_tasks=('bible_next_verse_en',)", "--config.eval_tasks_every=2",
                          "--config.eval_tasks_limit=8")
    trainer.train_run(config, str(tmp_path / "whole"))
    rows = RunDir.of(str(tmp_path / "whole")).read_metrics()
    key = "eval/bible_next_verse_en/acc"
    assert [r["step"] for r in rows if key in r] == [0, 2, 4]
    # What the loop wrote at a step is what `evaluate` gives that step's checkpoint, at the context
    # the loop scores with: the run's seq_len.
    for step in (2, 4):
        out = tmp_path / f"eval{step}"
        assert evaluate_main(["--workdir", str(tmp_path / "whole"), "--step", str(step), "--tasks",
                              "bible_next_verse_en", "--limit", "8", "--batch_size", "8", "--max_length",
                              str(config.seq_len), "--output", str(out)]) == 0
        results = json.loads((out / "results.json").read_text())
        row = next(r for r in rows if r["step"] == step and key in r)
        assert (row[key], row["eval/bible_next_verse_en/acc_norm"]) == tuple(
            results["results"]["bible_next_verse_en"][m] for m in ("acc,none", "acc_norm,none"))
    # Resumed from step 2 (its later checkpoint lost), the run writes the same metrics.
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")
    trainer.train_run(config, str(tmp_path / "resumed"))
    assert comparable(RunDir.of(str(tmp_path / "resumed")).read_metrics()) == comparable(rows)


def test_unknown_eval_task_is_a_config_error_before_compile(tmp_path):
    with pytest.raises(ConfigError, match=r"eval_tasks=\('nosuch_task',\): task 'nosuch_task' is not a harness task"):
        checks.check_config(small_config("--config.eval_tasks=('nosuch_task',)"))
