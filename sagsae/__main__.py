"""Entry point of `python -m sagsae` and the `sagsae` console script."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    from sagsae.cli import run  # Lightning is imported only by the CLI, never by the torch-only core

    run(argv)


if __name__ == "__main__":
    main()
