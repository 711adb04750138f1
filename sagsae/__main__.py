"""`sagsae` and `python -m sagsae`: the front door. `fit`, `validate` and `test` go to the LightningCLI; the
other commands are small argparse programs (sagsae/commands/)."""

from __future__ import annotations

import importlib
import sys

from sagsae.commands import COMMANDS, TRAIN


def usage() -> str:
    lines = ["usage: sagsae COMMAND [options]   (sagsae COMMAND --help for its options)", "",
             "Sign-Aware Gated sparse autoencoders and baselines, trained on a frozen LM's activations.", "",
             "commands:", *(f"  {name:<9} {line}" for name, (_, line) in COMMANDS.items()), "",
             "example: sagsae fit --config configs/default.yaml"]
    return "\n".join(lines)


def configure_torch() -> None:
    """fp32 matrix products on CUDA run on tensor cores as TF32 (PyTorch's default leaves them in full fp32, several
    times slower on a GPU); CPU arithmetic is left as it is."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True  # the flag Lightning reads back (the newer per-backend API trips it)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if args[0] not in COMMANDS:
        raise SystemExit(f"sagsae: unknown command {args[0]!r}\n\n{usage()}")
    configure_torch()
    module = importlib.import_module(COMMANDS[args[0]][0])  # Lightning loads only with a command that needs it
    if COMMANDS[args[0]][0] == TRAIN:
        module.run(argv)  # None: LightningCLI reads the command line itself (and DDP re-launches it unchanged)
    else:
        module.main(args[1:])


if __name__ == "__main__":
    main()
