"""The hand-written TensorBoard event writer, read back by an independent implementation:
TFRecord framing parsed here, CRCs checked with tensorboardX's crc32c, each record parsed by its
protobuf classes."""

import glob
import json
import math
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np

from cpt_jax.metrics import MetricWriter
from cpt_jax.tensorboard import EventWriter, crc32c

from helpers import ROOT, read_events, scalars


def test_crc32c_check_values():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


def test_events_read_back_by_tensorboardx_protos(tmp_path):
    t0 = time.time()
    w = EventWriter(str(tmp_path / "tb"))
    written = [("train/loss", 3, 2.718281828), ("eval/zh/loss", 3, 0.1), ("train/lr", 10**12, -1e-7),
               ("data/日本_fraction", -1, 1e39), ("perf/mfu", 0, 0.0)]
    expected = [(t, s, float(np.float32(v)) if abs(v) < 3e38 else math.inf) for t, s, v in written]
    for tag, step, value in written:
        w.add_scalar(tag, value, step)
    w.close()
    w.close()  # a second close is harmless
    t1 = time.time()
    [path] = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    host = re.escape(socket.gethostname())
    assert re.fullmatch(rf"events\.out\.tfevents\.\d{{10}}\.{host}\.{os.getpid()}\.\d+", os.path.basename(path))
    events = read_events(path)
    assert events[0].file_version == "brain.Event:2"
    assert [t0 <= e.wall_time <= t1 for e in events] == [True] * (1 + len(written))
    assert scalars(events) == expected  # values float32-rounded; 1e39 beyond float32: inf


def test_two_writers_in_one_second_get_two_files(tmp_path):
    EventWriter(str(tmp_path)).close()
    EventWriter(str(tmp_path)).close()
    assert len(glob.glob(str(tmp_path / "events.out.tfevents.*"))) == 2


def test_metric_writer_events_end_to_end(tmp_path):
    w = MetricWriter(str(tmp_path / "metrics.jsonl"), str(tmp_path / "tb"), None)
    w.write(0, {"eval/zh/loss": 5.5})
    w.write(10, {"train/loss": np.float32(4.25), "train/lr": 3e-4})
    [path] = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    events = read_events(path)  # readable before close: each write is flushed
    w.close()
    assert scalars(events) == [("eval/zh/loss", 0, 5.5), ("train/loss", 10, 4.25),
                               ("train/lr", 10, float(np.float32(3e-4)))]
    assert [json.loads(line) for line in open(tmp_path / "metrics.jsonl")] == [
        {"step": 0, "eval/zh/loss": 5.5}, {"step": 10, "train/loss": 4.25, "train/lr": 3e-4}]


def test_metric_writer_imports_neither_tensorboardx_nor_torch(tmp_path):
    code = ("import sys; from cpt_jax.metrics import MetricWriter; "
            f"w = MetricWriter({str(tmp_path / 'm.jsonl')!r}, {str(tmp_path / 'tb')!r}, None); "
            "w.write(1, {'train/loss': 1.0}); w.close(); "
            "assert 'torch' not in sys.modules and 'tensorboardX' not in sys.modules, "
            "[m for m in ('torch', 'tensorboardX') if m in sys.modules]")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env, timeout=120)
