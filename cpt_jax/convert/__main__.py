"""`python -m cpt_jax.convert import|export|extend-vocab`: pretrained weights in and out.

  python -m cpt_jax.convert import --src smollm2|gemma3-270m --dst /tmp/m       # a bundled GGUF
  python -m cpt_jax.convert import --src HF_DIR|FILE.gguf --dst DIR
  python -m cpt_jax.convert export --src DIR --dst HF_DIR [--dtype bfloat16]   # a run or a converted model
  python -m cpt_jax.convert extend-vocab --src DIR --dst DIR --source zh --vocab_size 8000 [--config configs/X.py]

Bad input prints one `convert error:` line and exits with status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys

from cpt_jax import cli, convert
from cpt_jax.config import base, load_file
from cpt_jax.errors import ConfigError
from cpt_jax.convert.vocab import extend_vocab


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpt_jax.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("import", help="HF dir, .gguf file or bundled model -> a cpt_jax model dir")
    p.add_argument("--src", required=True, help=f"HF model dir, .gguf file, or one of: {', '.join(convert.BUNDLED)}")
    p.add_argument("--dst", required=True)
    p = sub.add_parser("export", help="a run's workdir or a converted model -> an HF model dir")
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p = sub.add_parser("extend-vocab", help="add a target-language tokenizer's pieces and grow the embeddings")
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--source", default="zh", help="the data source (config's data.sources) to train pieces on")
    p.add_argument("--vocab_size", type=int, default=8000, help="pieces of the target-language tokenizer")
    p.add_argument("--config", default=None, help="config file whose data.sources to use (default: the base config)")
    args = parser.parse_args(argv)

    def job() -> None:
        try:
            if args.command == "import":
                convert.import_model(args.src, args.dst)
            elif args.command == "export":
                convert.export_model(args.src, args.dst, args.dtype, args.step)
            else:
                data = (load_file(args.config) if args.config else base()).data
                print(json.dumps(extend_vocab(args.src, args.dst, data, args.source, args.vocab_size), indent=2))
        except (ValueError, FileNotFoundError, FileExistsError) as e:
            raise ConfigError(str(e)) from None

    return cli.run(job, label="convert error", join_processes=False)

if __name__ == "__main__":
    sys.exit(main())
