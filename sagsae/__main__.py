"""Entry point of `python -m sagsae` and the `sagsae` console script.

`fit`, `validate`, `test` go to the LightningCLI; the other subcommands are small argparse programs.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {"params": "sagsae.params", "export": "sagsae.export", "cache": "datamodules.cache",
               "sweep": "sagsae.sweep", "synth": "sagsae.synth",
               "report": "sagsae.report"}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[args[0]]).main(args[1:])
    from sagsae.cli import run  # Lightning is imported only by the CLI, never by the torch-only core

    run(argv)  # None: LightningCLI reads the command line itself (and DDP re-launches it unchanged)


if __name__ == "__main__":
    main()
