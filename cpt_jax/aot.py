r"""A run compiled ahead of time for a TPU topology, on any machine: libtpu compiles for a slice
it is not on, so a run's memory per chip, its collectives and the splash kernel compiled by
Mosaic are known before anyone pays for the pod.

    pip install -e '.[tpu]'     # libtpu; no TPU needed
    python -m cpt_jax.aot --config configs/bible.py:1393m --topology v5p:2x2x4 --config.seq_len=2048
    python -m cpt_jax.aot --config ... --topology v5p-32           # an accelerator type, as gcloud names it
    python -m cpt_jax.aot --config ... --topology v5e:16x16 --num_slices 2 --json

The run is built as `cpt_jax.main` builds it (checks.check_config, checks.model_config,
update.compile_steps: the mesh of `mesh.shape` over the topology's chips, the batch, the replay
sources, packing, remat and the attention kernel), for TPU, with no data, weights or tokenizer
training: the vocabulary is `model.vocab_size`, else the tokenizer file's (`data.tokenizer.path`),
else the size a trained tokenizer gets (`data.tokenizer.vocab_size`). Several slices: the mesh's
data axis is the one that crosses them (over DCN); the others stay within a slice.

Printed per chip, for the train step and the eval step (at the trainer's held-out batch size, one
microbatch: batch_size / grad_accum rows): arguments (the state and the batch),
temporaries, and the total (with the outputs not aliased to donated arguments and the program
code) against the chip's HBM; whether the run fits; the compile time; the number of each
collective op in the compiled train step. `--json`: one object (keys `topology`, `chips`,
`slices`, `mesh`, `argument_bytes`, `temp_bytes`, `hbm_bytes`, `fits`, `compile_s`,
`collectives`; also `total_bytes`, `eval`, `largest`, `model`).

Exit codes: 0 it fits; 2 it does not (the report, then one line naming its largest buffers), or
bad input (an unknown topology, a mesh that does not match the chip count, a config field): one line.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Sequence

import jax
import ml_collections
from absl import flags
from jax.experimental import topologies

from cpt_jax import checks, cli, models, update
from cpt_jax.config import expand_runs
from cpt_jax.data import pipeline
from cpt_jax.data.tokenizer import EOS_ID, load_tokenizer, made_vocab_size
from cpt_jax.errors import ConfigError
from cpt_jax.rundir import RunDir

log = logging.getLogger("cpt_jax")

# HBM per chip, GiB; v4 and v5p run one JAX device per chip (megacore), v5e and v6e have one core.
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
_ALIASES = {"v5litepod": "v5e"}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Topology:
    generation: str  # a key of HBM_GIB
    name: str  # as libtpu takes it, e.g. "v5p:4x4x4"
    shape: tuple[int, ...]  # chips along each axis of one slice

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def hbm_bytes(self) -> int:
        return HBM_GIB[self.generation] << 30

    @property
    def accelerator_type(self) -> str:
        """As gcloud names it: v4 and v5p count TensorCores (two per chip), v5e and v6e chips."""
        if len(self.shape) == 3:
            return f"{self.generation}-{2 * self.chips}"
        return f"{'v5litepod' if self.generation == 'v5e' else self.generation}-{self.chips}"


def parse_topology(text: str) -> Topology:
    """`v5p:4x4x4` (a slice's chips along each axis), or an accelerator type as gcloud names it
    (`v5p-128`: v4 and v5p count TensorCores, two per chip; v5e and v6e count chips), given the
    usual shape of its slice. Raises ConfigError naming the flag."""
    m = re.fullmatch(r"(v\d+[a-z]*)(?::(\d+(?:x\d+){1,2})|-(\d+))", text.strip())
    generation = _ALIASES.get(m.group(1), m.group(1)) if m else None
    if generation not in HBM_GIB:
        raise ConfigError(f"--topology={text!r} is not a TPU topology: give GENERATION:SHAPE (e.g. v5p:4x4x4, "
                          f"v5e:2x4) or an accelerator type (e.g. v5p-32); generations: {', '.join(HBM_GIB)}")
    dims = 3 if generation in ("v4", "v5p") else 2
    if m.group(2):
        shape = tuple(int(s) for s in m.group(2).split("x"))
        if len(shape) != dims or 0 in shape:
            raise ConfigError(f"--topology={text!r}: a {generation} slice has {dims} axes of chips, e.g. "
                              f"{generation}:{'x'.join(['2'] * dims)}")
    else:
        count = int(m.group(3))
        chips = count // 2 if dims == 3 else count
        if chips < 1 or chips & (chips - 1) or (dims == 3 and count % 2):
            raise ConfigError(f"--topology={text!r}: give the slice's shape instead (e.g. {generation}:"
                              f"{'x'.join(['4'] * dims)})")
        shape = _usual_shape(chips, dims)
    return Topology(generation, f"{generation}:{'x'.join(map(str, shape))}", shape)


def _usual_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The shape Cloud TPU gives a slice of `chips` (a power of two) chips: v5e-8 is 2x4, v5e-16
    4x4; v5p-8 (4 chips) 2x2x1, v5p-32 2x2x4, v5p-128 4x4x4."""
    shape = [2, 2, 1] if dims == 3 and chips >= 4 else [1] * dims
    while math.prod(shape) < chips:  # double the last of the smallest axes
        i = max(j for j, s in enumerate(shape) if s == min(shape))
        shape[i] *= 2
    return tuple(shape)


def topology_devices(topo: Topology, num_slices: int = 1) -> list:
    """The devices of `num_slices` slices of `topo`, to compile for (libtpu; nothing runs on them)."""
    bounds = (min(2, topo.shape[0]), min(2, topo.shape[1]), 1)  # chips per host: 2x2 (the hosts of a slice)
    # A program over its chip's HBM still compiles (read before libtpu starts), so that the report
    # can say by how much and name its largest arrays, as the compiler's own refusal does not.
    args = os.environ.get("LIBTPU_INIT_ARGS", "")
    if "xla_tpu_no_crash_on_oom" not in args:
        os.environ["LIBTPU_INIT_ARGS"] = f"{args} --xla_tpu_no_crash_on_oom=true".strip()
    # What a TPU VM's environment says; off one, libtpu prints warnings without them.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topo.accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Compiling only: several compiles at once (tests, a table's) may each load libtpu, which
    # otherwise takes a machine-wide lock (/tmp/libtpu_lockfile) and refuses the second.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topo.name, chip_config_name="megacore" if len(topo.shape) == 3 else "default",
            chips_per_host_bounds=bounds, num_slices=num_slices)
    except (RuntimeError, ValueError) as e:  # libtpu missing, or a topology it does not know
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--topology={topo.name!r}: {first} (libtpu compiles it: pip install -e '.[tpu]')") from None
    return list(desc.devices)


@dataclasses.dataclass
class Report:
    topology: str
    chips: int  # per slice
    slices: int
    mesh: dict[str, int]
    model: dict  # size, params, dtype, attention, remat, batch, grad_accum, seq_len
    argument_bytes: int  # per chip, the train step's: the state and the batch
    temp_bytes: int
    total_bytes: int
    hbm_bytes: int
    fits: bool
    compile_s: float  # the train and eval steps, together
    collectives: dict[str, int]  # op -> count in the compiled train step
    eval: dict[str, int]  # argument_bytes, temp_bytes, total_bytes of the eval step
    largest: list[str]  # the largest arrays per chip in the compiled train step, for a run that does not fit

    def text(self) -> str:
        gib = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"  # noqa: E731
        m = self.model
        lines = [
            f"{self.topology} x {self.slices} slice(s), {self.chips * self.slices} chips, mesh "
            + " x ".join(f"{k} {v}" for k, v in self.mesh.items()),
            f"model {m['size']} ({m['params']:,} params), {m['dtype']} compute, {m['attention']} attention, remat "
            f"{m['remat']}; batch {m['batch']} x {m['seq_len']} tokens, grad_accum {m['grad_accum']}",
            f"per chip, train step: state+batch {gib(self.argument_bytes)}, temporaries {gib(self.temp_bytes)}, "
            f"total {gib(self.total_bytes)} of {gib(self.hbm_bytes)} HBM",
            f"per chip, eval step:  params+batch {gib(self.eval['argument_bytes'])}, temporaries "
            f"{gib(self.eval['temp_bytes'])}, total {gib(self.eval['total_bytes'])}",
            "collectives (train step): " + ", ".join(f"{k} {v}" for k, v in self.collectives.items()),
            f"compiled in {self.compile_s:.1f}s: {'fits' if self.fits else 'DOES NOT FIT'}",
        ]
        return "\n".join(lines)


def compile_run(config: ml_collections.ConfigDict, topology: str, num_slices: int = 1) -> Report:
    """The run of `config` compiled for `num_slices` slices of `topology` (`parse_topology`)."""
    topo = parse_topology(topology)
    if num_slices < 1:
        raise ConfigError(f"--num_slices={num_slices} must be >= 1")
    devices = topology_devices(topo, num_slices)
    mesh = checks.check_config(config, devices)
    vocab, eos = _vocabulary(config)
    source = _init_model(config)
    mcfg = checks.model_config(config, source["vocab_size"] if source else vocab, source,
                               seq_len=config.seq_len, platform="tpu")
    frozen = None if not config.optimizer.freeze else _frozen(config, mcfg)
    used = [n for n in config.data.sources
            if any(w[n] > 0 for _, w in pipeline.mixture_stages(config.data, config.total_steps))]  # as pipeline.mixture
    documents = config.data.packing == "documents"
    t0 = time.perf_counter()
    try:
        steps = update.compile_steps(mcfg, config.optimizer, config.total_steps, mesh, config.batch_size,
                                     config.seq_len, len(used), frozen=frozen, document_end=eos if documents else None)
        rows = config.batch_size // config.optimizer.grad_accum  # the trainer's held-out batches: a microbatch
        batch = lambda shape, dtype, sh: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)  # noqa: E731
        with jax.set_mesh(mesh):
            evaluate = steps.eval.lower(steps.abstract_state.params,
                                        batch((rows, config.seq_len + 1), "int32", steps.batch_sharding["tokens"]),
                                        batch((rows,), "float32", steps.batch_sharding["valid"])).compile()
    except jax.errors.JaxRuntimeError as e:  # one array larger than the chip's memory: the compiler names it
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise ConfigError(f"the run does not fit on {topo.name} (mesh {dict(mesh.shape)}): the TPU compiler says "
                          f"{' '.join(str(e).split())}") from None
    compile_s = time.perf_counter() - t0
    train_mem, eval_mem = _memory(steps.program.memory_analysis()), _memory(evaluate.memory_analysis())
    fits = max(train_mem["total_bytes"], eval_mem["total_bytes"]) <= topo.hbm_bytes
    hlo = steps.program.as_text()
    return Report(
        topology=topo.name, chips=topo.chips, slices=num_slices, mesh=dict(mesh.shape),
        model={"size": config.model.size, "params": mcfg.param_count(), "dtype": mcfg.dtype,
               "attention": mcfg.attention, "remat": mcfg.remat, "batch": config.batch_size, "seq_len": config.seq_len,
               "grad_accum": config.optimizer.grad_accum},
        argument_bytes=train_mem["argument_bytes"], temp_bytes=train_mem["temp_bytes"],
        total_bytes=train_mem["total_bytes"], hbm_bytes=topo.hbm_bytes, fits=fits, compile_s=round(compile_s, 1),
        collectives=count_collectives(hlo), eval=eval_mem, largest=[] if fits else largest_arrays(hlo))


def _vocabulary(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(the model's vocabulary as the trainer sizes it, the EOS id documents end with)."""
    t = config.data.tokenizer
    path = t.path
    if not path:  # a tokenizer made here: its special ids are the fixed ones
        return config.model.vocab_size or made_vocab_size(t.model_type, t.vocab_size), EOS_ID
    tok = load_tokenizer(path)
    try:
        eos = pipeline.framing(config.data, tok).eos_id
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return config.model.vocab_size or tok.vocab_size, eos


def _init_model(config: ml_collections.ConfigDict) -> dict | None:
    """The architecture of init_from's (or branch_from's) latest checkpoint, from its metadata
    alone, where model.size="init_from"."""
    if config.model.size != "init_from":
        return None
    where = config.branch_from or config.init_from
    run = RunDir.of(where)
    if run.latest_step() is None:
        raise ConfigError(f"model.size='init_from': {where!r} has no checkpoint to read the architecture from "
                          f"(a bundled model becomes one with `python -m cpt_jax.convert import`)")
    return run.meta(config.branch_step or None).model


def _frozen(config: ml_collections.ConfigDict, mcfg: models.ModelConfig):
    """optimizer.freeze resolved as the trainer resolves it (with init_from's vocabulary extension)."""
    parent = config.branch_from or config.init_from
    extension = RunDir.of(parent).meta(config.branch_step or None).vocab_extension if parent else None
    return checks.frozen_mask(config, mcfg, extension, repr(parent) if parent else "this run's model")


def _memory(mem) -> dict[str, int]:
    """Bytes per chip: arguments, temporaries, and the total a step holds at once (arguments,
    temporaries, outputs that do not reuse donated arguments, the program's code)."""
    total = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
             - mem.alias_size_in_bytes + mem.generated_code_size_in_bytes)
    return {"argument_bytes": int(mem.argument_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
            "total_bytes": int(total)}


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.-]+) ")
_OP = re.compile(r"^\s*(?:ROOT )?%[\w.-]+ = .*? (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def count_collectives(hlo: str) -> dict[str, int]:
    """How many of each collective op the compiled (optimized, per-device) HLO holds, counted once
    where they are written (a loop body's once). The TPU compiler writes a reduce-scatter as an
    all-reduce inside a computation named all-reduce-scatter: counted as a reduce-scatter."""
    counts = collections.Counter({op: 0 for op in COLLECTIVES})
    computation = ""
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            computation = (_COMPUTATION.match(line) or [None, ""])[1]
            continue
        op = _OP.match(line)
        if op:
            counts["reduce-scatter" if computation.startswith("all-reduce-scatter") else op[1]] += 1
    return dict(counts)


_ARRAY = re.compile(r"^\s*(?:ROOT )?%([\w.-]+) = (\w+)\[([\d,]*)\]\S* (\w[\w-]*)\(")
_CALLED = re.compile(r"(?:body|condition|to_apply)=%([\w.-]+)|branch_computations=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]+)"')
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8}


def largest_arrays(hlo: str, n: int = 5) -> list[str]:
    """The `n` largest arrays per chip in the compiled program: the results of the instructions
    of its entry computation and of the loops and calls it runs (not those inside fusions, which
    are no buffers of their own), each as `dtype[shape] size (what made it)`."""
    lines = hlo.splitlines()
    called = {"ENTRY"}
    for line in lines:
        if " call(" in line or " while(" in line or " conditional(" in line:
            for one, many in _CALLED.findall(line):
                called.update([one] if one else [c.strip().lstrip("%") for c in many.split(",")])
    found: dict[tuple[str, str, str], int] = {}
    computation = ""
    for line in lines:
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            computation = "ENTRY" if line.startswith("ENTRY") else (_COMPUTATION.match(line) or [None, ""])[1]
            continue
        m = _ARRAY.match(line)
        if computation not in called or not m or m[2] not in _BYTES or m[4] in ("bitcast", "get-tuple-element"):
            continue
        what = _OP_NAME.search(line)
        key = (m[2], m[3], what[1].replace("\\'", "'") if what else f"{m[4]} {m[1]}")
        found[key] = _BYTES[m[2]] * math.prod(int(d) for d in m[3].split(",") if d)
    top = sorted(found.items(), key=lambda kv: -kv[1])[:n]
    return [f"{dtype}[{shape}] {size / 2**30:.2f} GiB ({label})" for (dtype, shape, label), size in top]


CLI = cli.Command(__doc__, config=cli.CONFIG_HELP, required=("config", "topology"))
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology to compile for: GENERATION:SHAPE (v5p:4x4x4, "
                                "v5e:2x4) or an accelerator type (v5p-32, v6e-8).", flag_values=CLI.flags)
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices (multi-slice over DCN); the mesh's data axis crosses them.",
                                   flag_values=CLI.flags)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the text report.", flag_values=CLI.flags)
_RUN = flags.DEFINE_string("config_run", "", "For a config with `runs`: the run to compile.", flag_values=CLI.flags)


def compile_command() -> None:
    config = _the_run(CLI.config.value, _RUN.value)
    report = compile_run(config, _TOPOLOGY.value, _NUM_SLICES.value)
    print(json.dumps(dataclasses.asdict(report)) if _JSON.value else report.text(), flush=True)
    if not report.fits:
        need = max(report.total_bytes, report.eval["total_bytes"])
        raise ConfigError(f"the run needs {need / 2**30:.2f} GiB per chip, more than the {report.hbm_bytes >> 30} GiB "
                          f"of {report.topology}; largest arrays: {'; '.join(report.largest)}")


def _the_run(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The config itself, or for a config with `runs` the one named."""
    if "runs" not in config:
        if name:
            raise ConfigError(f"--config_run={name!r}: the config has no runs")
        return config
    runs = {n: c for n, c, _ in expand_runs(config, "/aot")}
    if name not in runs:
        raise ConfigError(f"--config_run={name!r}: give one of the config's runs: {', '.join(sorted(runs))}")
    return runs[name]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cpt_jax.aot ARGS...` in this process (argv without the program name): the exit code."""
    return CLI.run(compile_command, argv)


if __name__ == "__main__":
    sys.exit(main())
