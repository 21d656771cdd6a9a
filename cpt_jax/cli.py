"""How every command line starts and ends. Each entry point (`cpt_jax.main`, `cpt_jax.sweep`,
`cpt_jax.convert`, `cpt_jax.evaluate`, `cpt_jax.data.prepare`, `bench/*.py`) is a `Command`:

- absl flags of its own (a FlagValues per command, so `--help` lists exactly its flags), with
  `--config FILE[:ARG]` and ml_collections' `--config.FIELD=VALUE` overrides where a config is
  taken, and `--coordinator_address`, `--num_processes`, `--process_id` where a job can span
  processes (it then joins `jax.distributed` before any device is touched: cpt_jax.distributed);
- a subcommand, where it has some, as the first positional argument (`sweep report`);
- one mapping of how it ended to an exit code:

    0  finished, or preempted (SIGTERM) after saving: the same command resumes
    1  a run error (a non-finite loss); the message names the last good checkpoint
    2  bad input (a config field, a file, a flag), found before anything is written: one line
       on stderr, `LABEL: message`

`Command.run(job, argv)` is a whole command line in this process: each entry point's
`main(argv) -> int` is one, so tests call it and get the exit code, with the flags and logging
left as they were.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence

from absl import flags
from ml_collections import config_flags

from cpt_jax import distributed
from cpt_jax.errors import ConfigError, Preempted, RunError
from cpt_jax.metrics import setup_logging

CONFIG_HELP = "Config file, e.g. configs/demo.py[:arg]; any field can be overridden: --config.optimizer.peak_lr=1e-4."
HELP = ("--help", "-h", "--helpshort", "--helpfull")

log = logging.getLogger("cpt_jax")


class Command:
    """One entry point's command line. `config`: the help of its `--config` flag (None: it takes no
    config); `processes`: it can span processes; `required`: the flags it cannot run without;
    `commands`: its subcommands, each with the names of the flags it takes (a flag given to a
    command that does not take it is bad input), and `default_command` the one run without a
    subcommand (None: one must be given)."""

    def __init__(self, doc: str, *, label: str = "config error", config: str | None = None,
                 processes: bool = False, required: Sequence[str] = (),
                 commands: Mapping[str, Sequence[str]] | None = None, default_command: str | None = None):
        self.doc, self.label, self.required = doc, label, tuple(required)
        self.commands, self.default_command = dict(commands or {}), default_command
        self.flags = flags.FlagValues()
        self._argv: list[str] = []  # the command line being run: the config flag reads its overrides here
        self.config = None if config is None else config_flags.DEFINE_config_file(
            "config", None, config, flag_values=self.flags, sys_argv=self._argv)
        self._processes = [
            flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for a run over several processes "
                                "started by hand (TPU pods and SLURM jobs are detected).", flag_values=self.flags),
            flags.DEFINE_integer("num_processes", 0, "With --coordinator_address: how many processes.",
                                 flag_values=self.flags),
            flags.DEFINE_integer("process_id", -1, "With --coordinator_address: this process's index.",
                                 flag_values=self.flags),
        ] if processes else []

    def run(self, job: Callable[..., object], argv: Sequence[str] | None = None) -> int:
        """The command line `argv` (default: this process's, without the program name): its help,
        or `job()` (`job(command)` for a command with subcommands) once the flags are parsed.
        Returns the exit code; bad input prints its one line."""
        argv = list(sys.argv[1:] if argv is None else argv)
        if any(a in HELP for a in argv):
            print(self.usage())
            return 0
        with _logging_restored():
            setup_logging()
            try:
                args = self._parse(argv)
                if self._processes:
                    try:
                        distributed.initialize(*(f.value for f in self._processes))
                    except ValueError as e:
                        raise ConfigError(str(e)) from None
                job(*args)
            except ConfigError as e:
                print(f"{self.label}: {e}", file=sys.stderr)
                return 2
            except RunError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            except Preempted as e:
                log.warning("%s", e)  # the scheduler restarts the job, which resumes
            finally:
                self._reset()
        return 0

    def _parse(self, argv: list[str]) -> list[str]:
        """The flags of `argv` parsed; returns [command] for a command with subcommands, else [].
        A bad flag, `--config.X` override or argument raises ConfigError with its one line."""
        self._argv[:] = ["", *argv]
        file = _config_file(argv) if self.config is not None else None
        if file is not None and not os.path.isfile(file):
            raise ConfigError(f"--config {file}: no such config file")
        try:
            args = self.flags(self._argv)[1:]
        except (flags.Error, AttributeError, KeyError, TypeError, ValueError, FileNotFoundError) as e:
            raise ConfigError(_flag_error(e, argv)) from None
        command = self._command(args)
        missing = [name for name in self.required if self.flags[name].value is None]
        if missing:
            raise ConfigError(f"--{missing[0]} is required")
        return command

    def _command(self, args: list[str]) -> list[str]:
        """[the subcommand of these positional args], checked with the flags given; [] without subcommands."""
        if not self.commands:
            if args:
                raise ConfigError(f"unexpected arguments: {' '.join(args)}")
            return []
        command = args[0] if args else self.default_command
        if command is None:
            raise ConfigError(f"a command is needed: {', '.join(self.commands)}")
        if len(args) > 1 or command not in self.commands:
            raise ConfigError(f"unexpected arguments: {' '.join(args)}; commands: {', '.join(self.commands)}")
        takes = {*self.commands[command], *(f.name for f in self._processes)}
        given = {name.split(".")[0] for name in self.flags if self.flags[name].present}
        if given - takes:
            raise ConfigError(f"--{sorted(given - takes)[0]} is not a flag of `{command}`")
        return [command]

    def _reset(self) -> None:
        """Every flag back to its default, and the `--config.X` flags a parse defined removed."""
        for name in [n for n in self.flags if n.startswith("config.")]:
            delattr(self.flags, name)
        self.flags.unparse_flags()
        self._argv.clear()

    def usage(self) -> str:
        """--help: the entry point's docstring, its subcommands and its flags."""
        lines = [self.doc.strip(), ""]
        if self.commands:
            lines.append("commands (the first argument), with their flags:")
            for command, takes in self.commands.items():
                default = " (the default)" if command == self.default_command else ""
                lines.append(f"  {command}{default}: " + " ".join(f"--{f}" for f in takes))
            lines.append("")
        lines.append("flags:" if list(self.flags) else "flags: none")
        for name in self.flags:
            f = self.flags[name]
            default = " (required)" if name in self.required else "" if f.default is None else \
                f" (default: {f.default_as_str})"
            lines.append(flags.text_wrap(f"--{'[no]' if f.boolean else ''}{name}: {f.help}{default}",
                                         indent="      ", firstline_indent="  "))
        return "\n".join(lines)

    def config_args(self) -> list[str]:
        """`--config FILE` (absolute) and the `--config.X` overrides of the command line being
        run, each as one `--config.X=V`: how the commands it launches get the same config."""
        file, sep, arg = config_flags.get_config_filename(self.flags["config"]).partition(":")
        out = ["--config", os.path.abspath(file) + sep + arg]
        for i, a in enumerate(self._argv):
            if a.startswith("--config."):
                out.append(a if "=" in a else f"{a}={self._argv[i + 1]}")
        return out


def _flag_error(e: BaseException, argv: list[str]) -> str:
    """absl's or ml_collections' error as one line; a mistyped `--config.X` says so."""
    while isinstance(e, BaseException) and e.args:  # ml_collections nests KeyError in AttributeError
        e = e.args[0]
    detail = "; ".join(line.strip("\"' ") for line in str(e).splitlines())
    field = detail.split(";")[0]
    bad = [a.split("=")[0] for a in argv if a.startswith("--config.") and a.split("=")[0].endswith("." + field)]
    if bad:
        detail = f"{bad[0].removeprefix('--')}: no such config field{detail.removeprefix(field)}"
    return detail


def _config_file(argv: list[str]) -> str | None:
    """The FILE of `--config FILE[:ARG]` in argv: ml_collections reports a missing one only when
    the config is first used."""
    for i, a in enumerate(argv):
        name, eq, value = a.partition("=")
        if name in ("--config", "-config"):
            return (value if eq else argv[i + 1] if i + 1 < len(argv) else "").partition(":")[0]
    return None


@contextlib.contextmanager
def _logging_restored() -> Iterator[None]:
    """setup_logging's changes undone afterwards: a command run in a test's process leaves its logging."""
    loggers = [logging.getLogger(name) for name in ("", "cpt_jax", "absl")]
    saved = [(lg, lg.level, lg.handlers[:]) for lg in loggers]
    try:
        yield
    finally:
        for lg, level, handlers in saved:
            lg.setLevel(level)
            lg.handlers[:] = handlers
