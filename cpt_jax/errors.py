"""The project's errors, each with one meaning and one exit code (cpt_jax.cli maps them):

    ConfigError  bad input (a config field, a flag, a file), found before anything is written  -> 2
    RunError     a run that cannot go on (a non-finite loss); its last good checkpoint is kept   -> 1
    Preempted    SIGTERM: the step in flight finished and was saved; the same command resumes  -> 0
"""


class ConfigError(ValueError):
    """A config field, flag or input file that cannot work; raised before anything is written or compiled."""


class RunError(RuntimeError):
    """A run that cannot go on (a non-finite loss); its last good checkpoint is kept."""


class Preempted(Exception):
    """SIGTERM: the step in flight finished and was saved; the same command resumes."""
