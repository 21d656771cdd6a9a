"""bench/train_step.py runs for real on CPU and reports MFU by the issue's formula, checked here
against a hand count of the FLOPs; bench/replay.py runs."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys

import pytest

from cpt_jax.models import flops_per_token, model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_step_bench_on_cpu():
    v, t, b, peak = 512, 64, 8, 1e12
    out = subprocess.run(
        [sys.executable, "bench/train_step.py", "--sizes", "tiny,test", "--vocab_size", str(v), "--seq_len", str(t),
         "--batch_size", str(b), "--steps", "2", "--warmup", "1", "--peak_flops", str(peak), "--mesh", "2,2,2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["size"] for r in rows] == ["tiny", "test"]
    # Hand count, tiny: hidden 128, 4 heads of 32, 2 kv heads, SwiGLU 352, 4 layers, untied head.
    d, f, kv, n = 128, 352, 2 * 32, 4
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d  # q, o; k, v; gate, up, down; two norms
    non_embedding = n * per_layer + d + v * d  # + final norm + output head
    hand = 6 * non_embedding + 12 * n * d * t
    tiny = rows[0]
    assert tiny["non_embedding_params"] == non_embedding
    assert tiny["flops_per_token"] == hand
    assert tiny["tokens_per_s"] == pytest.approx(b * t / tiny["step_s"])
    assert tiny["mfu"] == pytest.approx(tiny["tokens_per_s"] * hand / (peak * 8))
    for r in rows:
        assert r["devices"] == 8 and r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2, "context": 1}
        assert r["attention"] == "xla" and r["dtype"] == "float32"  # what auto means on CPU
        assert r["compile_s"] > 0 and r["compiled_temp_gib"] > 0
        assert 0 < r["loss"] < 2 * 6.24  # finite, near log(512) = 6.24 at init


@pytest.mark.parametrize(("size", "flops", "bar_tokens_per_s", "bar_mfu"), [
    # 12 x (4 x 768^2 + 3 x 768 x 2048 + 2 x 768) + 768 + 32000 x 768 = 109,529,856 non-embedding
    ("ref125m", 6 * 109_529_856 + 12 * 12 * 768 * 2048, 350_000, 0.31),
    # 22 x (2 x 2048^2 + 2 x 2048 x 256 + 3 x 2048 x 5632 + 2 x 2048) + 2048 + 32000 x 2048
    ("ref1100m", 6 * 1_034_512_384 + 12 * 22 * 2048 * 2048, 56_000, 0.415),
])
def test_mfu_formula_reproduces_the_pytorch_bar(size, flops, bar_tokens_per_s, bar_mfu):
    """The issue's MFU figures for the PyTorch stack follow from its tokens/s and our count."""
    cfg = model_config(size, 32000)
    assert flops_per_token(cfg, 2048) == flops
    assert bar_tokens_per_s * flops / 989e12 == pytest.approx(bar_mfu, abs=0.005)


def test_replay_bench_times_the_bootstrap(capsys):
    main = runpy.run_path(os.path.join(ROOT, "bench", "replay.py"))["main"]
    assert main(["--resamples", "20"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["points"], out["resamples"], out["resamples_fitted"]) == (20, 20, 20)
    assert out["critical_interval"][0] <= out["critical_ratio"] <= out["critical_interval"][1]
