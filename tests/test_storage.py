"""Workdir files in a bucket: metrics lines, TensorBoard events, config and tokenizer written to
and read from `gs://` URLs through a local GCS emulator (gcp-storage-emulator, spoken to by gcsfs as to GCS),
and local writes that never leave a partial file."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from etils import epath

from cpt_jax import storage
from cpt_jax.data import corpora
from cpt_jax.data.tokenizer import load_tokenizer, train_tokenizer
from cpt_jax.metrics import MetricWriter
from cpt_jax.storage import read_jsonl

from helpers import read_events, scalars


@pytest.fixture(scope="module")
def bucket():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator"), "start",
                               f"--port={port}", "--default-bucket=test", "--in-memory"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://localhost:{port}"
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("localhost", port), timeout=1).close()
            break
        except OSError:
            assert time.time() < deadline and server.poll() is None
            time.sleep(0.1)
    yield "gs://test"
    server.kill()
    if old is None:
        del os.environ["STORAGE_EMULATOR_HOST"]
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = old


def test_metrics_lines_in_a_bucket(bucket):
    path = f"{bucket}/run/metrics.jsonl"
    storage.write_atomic(path, '{"step": 10, "train/loss": 2.5}\n{"step": 20, "train/loss": 2.0}\n')
    assert [r["step"] for r in read_jsonl(path)] == [10, 20]
    assert read_jsonl(f"{bucket}/run/absent.jsonl") == []


def test_metric_writer_in_a_bucket(bucket, tmp_path):
    w = MetricWriter(f"{bucket}/run2/metrics.jsonl", f"{bucket}/run2/tensorboard", None)
    w.write(0, {"eval/zh/loss": 5.5})
    w.write(10, {"train/loss": 4.25})
    [events] = list(epath.Path(f"{bucket}/run2/tensorboard").glob("events.out.tfevents.*"))
    local = tmp_path / "events"
    local.write_bytes(events.read_bytes())  # each write rewrote the whole object
    w.close()
    assert scalars(read_events(local)) == [("eval/zh/loss", 0, 5.5), ("train/loss", 10, 4.25)]
    assert [r["step"] for r in read_jsonl(f"{bucket}/run2/metrics.jsonl")] == [0, 10]


def test_config_and_tokenizer_in_a_bucket(bucket, tmp_path):
    storage.write_atomic(f"{bucket}/run/config.json", '{"seed": 0}')
    assert read_jsonl(f"{bucket}/run/config.json") == [{"seed": 0}]
    lines = [v for d in corpora.load_bible()["en"][:100] for v in d.verses]
    tok = train_tokenizer(lines, tmp_path / "sp.model", vocab_size=400)
    tok.save(f"{bucket}/run/tokenizer")
    again = load_tokenizer(f"{bucket}/run/tokenizer")
    assert again.fingerprint == tok.fingerprint
    assert again.encode("In the beginning") == tok.encode("In the beginning")


def test_local_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    storage.write_atomic(path, "old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError):
        storage.write_atomic(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.json"]  # no temp file left
