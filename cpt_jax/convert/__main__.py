"""`python -m cpt_jax.convert import|export|extend-vocab`: pretrained weights in and out.

  python -m cpt_jax.convert import --src smollm2|gemma3-270m --dst /tmp/m       # a bundled GGUF
  python -m cpt_jax.convert import --src HF_DIR|FILE.gguf --dst DIR
  python -m cpt_jax.convert export --src DIR --dst HF_DIR [--dtype bfloat16]   # a run or a converted model
  python -m cpt_jax.convert extend-vocab --src DIR --dst DIR --source zh --vocab_size 8000 [--config configs/X.py]

Bad input prints one `convert error:` line and exits with status 2; nothing is written.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import flags

from cpt_jax import cli, convert, dtypes
from cpt_jax.config import base
from cpt_jax.convert.vocab import extend_vocab
from cpt_jax.errors import ConfigError

CLI = cli.Command(__doc__, label="convert error",
                  config="extend-vocab: the config file whose data.sources to train pieces on (default: the base "
                         "config); its fields can be overridden: --config.data.dir=/data.",
                  required=("src", "dst"),
                  commands={"import": ("src", "dst"), "export": ("src", "dst", "dtype", "step"),
                            "extend-vocab": ("src", "dst", "source", "vocab_size", "config")})
_SRC = flags.DEFINE_string("src", None, "import: an HF model dir, a .gguf file, or one of: "
                           f"{', '.join(convert.BUNDLED)}; export, extend-vocab: a run's workdir or a converted model.",
                           flag_values=CLI.flags)
_DST = flags.DEFINE_string("dst", None, "The dir to write (it must not exist).", flag_values=CLI.flags)
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(dtypes.FLOATS), "export: the weights' dtype.",
                           flag_values=CLI.flags)
_STEP = flags.DEFINE_integer("step", None, "export: the checkpoint step (default: the latest).", flag_values=CLI.flags)
_SOURCE = flags.DEFINE_string("source", "zh", "extend-vocab: the data source (config's data.sources) to train "
                              "pieces on.", flag_values=CLI.flags)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8000, "extend-vocab: pieces of the target-language tokenizer.",
                                   flag_values=CLI.flags)


def convert_command(command: str) -> None:
    try:
        if command == "import":
            convert.import_model(_SRC.value, _DST.value)
        elif command == "export":
            convert.export_model(_SRC.value, _DST.value, _DTYPE.value, _STEP.value)
        else:
            data = (CLI.config.value or base()).data
            print(json.dumps(extend_vocab(_SRC.value, _DST.value, data, _SOURCE.value, _VOCAB_SIZE.value), indent=2))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise ConfigError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cpt_jax.convert COMMAND ARGS...` in this process (argv without the program name): the exit code."""
    return CLI.run(convert_command, argv)


if __name__ == "__main__":
    sys.exit(main())
