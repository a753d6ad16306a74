"""Command line: `python -m fused_ops train|parity`, also installed as the console script `fused-ops`.

Each subcommand lives in its own module, which adds its arguments (`add_arguments`) and runs the job
(`main(args) -> exit code`).
"""

from __future__ import annotations

import argparse
import sys

from fused_ops.makemore import parity, train

COMMANDS = {
    "train": (train, "train the makemore MLP on the bundled names, then evaluate it and sample names"),
    "parity": (parity, "the seed notebook's gradient check: manual backprop and fused ops vs autograd"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fused-ops", description="fused_ops: fused cross-entropy and BatchNorm"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{train,parity}")
    for name, (module, help_text) in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(subparser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, _ = COMMANDS[args.command]
    return module.main(args)


if __name__ == "__main__":
    sys.exit(main())
