"""Entry point of `python -m sagsae` and the `sagsae` console script."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["params"]:
        from sagsae.params import main as params

        return params(args[1:])
    if args[:1] == ["export"]:
        from sagsae.export import main as export

        return export(args[1:])
    from sagsae.cli import run  # Lightning is imported only by the CLI, never by the torch-only core

    run(argv)  # None: LightningCLI reads the command line itself (and DDP re-launches it unchanged)


if __name__ == "__main__":
    main()
