"""Every entry point's command line (cpt_jax/cli.py): its own flags in --help, subcommands, bad
input as one line with exit 2, flags and logging reset after an in-process call; and, in a
subprocess, the CLIs no other test starts as a user does."""

import importlib
import importlib.util
import logging
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES = {"coordinator_address", "num_processes", "process_id"}
ENTRY_POINTS = {  # module or bench script -> exactly the flags its --help lists
    "cpt_jax.main": {"config", "workdir", "allow_config_change", *PROCESSES},
    "cpt_jax.sweep": {"config", "sweep_dir", "backend", "only", "run", "resamples", *PROCESSES},
    "cpt_jax.convert.__main__": {"config", "src", "dst", "dtype", "step", "source", "vocab_size"},
    "cpt_jax.evaluate": {"workdir", "step", "tasks", "limit", "batch_size", "max_length", "dtype", "include_path",
                         "output"},
    "cpt_jax.data.prepare": {"config"},
    "cpt_jax.scaling.plan": {"compute", "fits", "json"},
    "cpt_jax.aot": {"config", "topology", "num_slices", "json", "config_run"},
    "bench/bootstrap_coverage.py": {"config", "sweep_dir", "datasets", "resamples", "wild"},
    "bench/data.py": {"rows", "steps"},
    "bench/freeze_memory.py": {"size", "vocab_size", "old_vocab", "batch_size", "seq_len"},
    "bench/harness.py": {"src", "requests", "batch_size"},
    "bench/replay.py": {"resamples"},
    "bench/scaling.py": set(),
    "bench/tpu_slices.py": {"out", "sizes", "generations", "table"},
    "bench/train_step.py": {"sizes", "vocab_size", "seq_len", "batch_size", "grad_accum", "dtype", "attention",
                            "remat", "loss_chunk", "unrolled", "packing", "doc_len", "mesh", "steps", "warmup",
                            "peak_flops", "compile_only"},
}


def entry_point(name: str):
    """The module of an entry point; a bench script is loaded from its file (bench/ is no package)."""
    if not name.endswith(".py"):
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(f"bench_{os.path.basename(name)[:-3]}", os.path.join(ROOT, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_help_lists_exactly_the_tools_own_flags(name, capsys):
    module = entry_point(name)  # all in one process: each defines its flags apart from the others'
    assert module.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(module.__doc__.strip())
    listed = {line.split(":")[0].removeprefix("  --").removeprefix("[no]") for line in out.splitlines()
              if line.startswith("  --")}
    assert listed == ENTRY_POINTS[name]


def test_subcommands_take_their_own_flags_only(tmp_path, capsys):
    convert = entry_point("cpt_jax.convert.__main__")
    dst = str(tmp_path / "out")
    for argv, line in [
        ([], "a command is needed: import, export, extend-vocab"),
        (["frob", "--src", "x", "--dst", dst], "unexpected arguments: frob; commands: import, export, extend-vocab"),
        (["import", "--src", "x", "--dst", dst, "--dtype", "bfloat16"], "--dtype is not a flag of `import`"),
        (["export", "--src", "x", "--dst", dst, "--dtype", "int8"], "flag --dtype=int8: value should be one of "
                                                                   "<float32|bfloat16|float16>"),
        (["import", "--dst", dst], "--src is required"),
    ]:
        assert convert.main(argv) == 2, argv
        assert capsys.readouterr().err.splitlines() == [f"convert error: {line}"]
    assert not os.path.exists(dst)


def test_flags_and_logging_are_reset_after_each_call(capsys):
    prepare, evaluate = entry_point("cpt_jax.data.prepare"), entry_point("cpt_jax.evaluate")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    # A --config.X flag defined by one call (seq_len, before the bad field) is gone before the next.
    for field in ("no_such", "no_such_either"):
        assert prepare.main(["--config", "configs/demo.py", "--config.seq_len=64", f"--config.{field}=1"]) == 2
        assert capsys.readouterr().err.splitlines() == [f"config error: config.{field}: no such config field"]
    assert prepare.main(["--config", "configs/nowhere.py"]) == 2
    assert capsys.readouterr().err.splitlines() == ["config error: --config configs/nowhere.py: no such config file"]
    assert evaluate.main(["--workdir", "/nonexistent", "--tasks", "x", "--limit", "some"]) == 2
    assert capsys.readouterr().err.startswith("evaluate error: flag --limit=some: invalid literal")
    assert evaluate.main(["--tasks", "no_such_task"]) == 2  # --workdir was not kept from the call before
    assert capsys.readouterr().err.splitlines() == ["evaluate error: --workdir is required"]
    assert (root.handlers, root.level) == (handlers, level)


@pytest.mark.parametrize("argv,code,out,err", [
    (["-m", "cpt_jax.convert", "import", "--src", "/nonexistent", "--dst", "/nonexistent/out"], 2, "",
     "convert error: --src /nonexistent: neither an HF model dir nor a .gguf file\n"),
    (["-m", "cpt_jax.evaluate", "--tasks", "bible_next_verse"], 2, "", "evaluate error: --workdir is required\n"),
    (["bench/scaling.py", "--help"], 0, "Fit time of both laws", ""),  # help, not the benchmark
])
def test_exit_code_and_message_as_a_user_sees_them(argv, code, out, err):
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == code and r.stdout.startswith(out) and r.stderr.startswith(err), r.stdout + r.stderr
    assert len(r.stderr.splitlines()) == (1 if err else 0), r.stderr
