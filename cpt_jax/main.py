r"""Train one run, or the runs a config lists, in a workdir; re-running the command resumes.

    python -m cpt_jax.main --config configs/demo.py --workdir /tmp/demo [--config.total_steps=50]

A config with `runs` trains each named run in `DIR/<name>` (`init_from="run:<name>"` links to a
sibling run) and prints their comparison at the end. The stages of a run are in
cpt_jax/trainer.py; how the command starts and ends (flags, logging, processes, exit codes) is
cpt_jax/cli.py.
"""

from __future__ import annotations

from absl import app, flags

from cpt_jax import cli, trainer

_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool("allow_config_change", False, "Resume a workdir whose config.json "
                                         "differs from this config in fields that change the result.")


def main(args: list[str]) -> None:
    if args:
        raise app.UsageError(f"unexpected arguments: {args}")
    if cli.CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("--config and --workdir are required")
    trainer.run_all(cli.CONFIG.value, _WORKDIR.value, _ALLOW_CONFIG_CHANGE.value)


if __name__ == "__main__":
    cli.main(main)
