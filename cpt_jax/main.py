r"""Train one run, or the runs a config lists, in a workdir; re-running the command resumes.

    python -m cpt_jax.main --config configs/demo.py --workdir /tmp/demo [--config.total_steps=50]

A config with `runs` trains each named run in `DIR/<name>` (`init_from="run:<name>"` links to a
sibling run) and prints their comparison at the end. The stages of a run are in
cpt_jax/trainer.py; how the command starts and ends (flags, logging, processes, exit codes) is
cpt_jax/cli.py.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

from cpt_jax import cli, trainer

CLI = cli.Command(__doc__, config=cli.CONFIG_HELP, processes=True, required=("config", "workdir"))
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go.", flag_values=CLI.flags)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool("allow_config_change", False, "Resume a workdir whose config.json "
                                         "differs from this config in fields that change the result.",
                                         flag_values=CLI.flags)


def train() -> None:
    trainer.run_all(CLI.config.value, _WORKDIR.value, _ALLOW_CONFIG_CHANGE.value)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cpt_jax.main ARGS...` in this process (argv without the program name): the exit code."""
    return CLI.run(train, argv)


if __name__ == "__main__":
    sys.exit(main())
