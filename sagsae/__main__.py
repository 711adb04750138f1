"""`sagsae` and `python -m sagsae`: the front door. `fit`, `validate` and `test` go to the LightningCLI; the
other commands are small argparse programs (sagsae/commands/).

A bad argument or file ends in one line on stderr that names it, and exit status 1; `--debug` (anywhere on the
command line) or SAGSAE_DEBUG=1 shows the whole traceback instead."""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import re
import sys

from sagsae.allocator import keep_freed_memory
from sagsae.commands import COMMANDS, TRAIN, end_process_group
from sagsae.shipped_configs import with_shipped_configs


DEBUG = "SAGSAE_DEBUG"
# What bad input raises: our own checks, a file that is missing or unwritable, a class path that does not import,
# a checkpoint that torch.load(weights_only=True) refuses, and a training run that diverged (its message names the
# rescue checkpoint). Anything else is a bug: traceback.
USER_ERRORS = (ValueError, TypeError, OSError, ImportError, FloatingPointError, argparse.ArgumentError,
               pickle.UnpicklingError)
# jsonargparse's scaffolding around the one line that matters (for a union type it lists every subtype tried)
NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value",
         "Expected a <class 'NoneType'>", "Expected a path but")


def root_cause(error: BaseException) -> BaseException:
    """The innermost explicitly chained cause (`raise … from error`): jsonargparse wraps a constructor's own
    error in a long "Does not validate against any of the Union subtypes" message."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def one_line(error: BaseException) -> str:
    """The error as one line, jsonargparse's scaffolding left out: a parser error as raised (it names the key),
    any other error's root cause."""
    cause = error if isinstance(error, argparse.ArgumentError) else root_cause(error)
    if isinstance(cause, pickle.UnpicklingError):  # Lightning's torch.load of a --ckpt_path, weights_only=True
        from sagsae.formats.serialization import unsafe_checkpoint_message

        return unsafe_checkpoint_message(cause, "the --ckpt_path checkpoint") or str(cause).splitlines()[0]
    lines = [line.strip(" -") for line in str(cause).splitlines()]
    kept = [line for line in lines if line and not line.startswith(NOISE)]
    text = " ".join(" ".join(kept).split())
    text = re.sub(r"Type .+? expects a function or a callable class: ", "", text)
    text = re.sub(r"\. Got value: Namespace\(.*\)$", ".", text)
    return text or type(cause).__name__


def usage() -> str:
    lines = ["usage: sagsae COMMAND [options]   (sagsae COMMAND --help for its options)", "",
             "Sign-Aware Gated sparse autoencoders and baselines, trained on a frozen LM's activations.", "",
             "commands:", *(f"  {name:<9} {line}" for name, (_, line) in COMMANDS.items()), "",
             "example: sagsae fit --config default   (sagsae configs lists the shipped configs)"]
    return "\n".join(lines)


def configure_torch() -> None:
    """fp32 matrix products on CUDA run on tensor cores as TF32 (PyTorch's default leaves them in full fp32, several
    times slower on a GPU); CPU arithmetic is left as it is."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True  # the flag Lightning reads back (the newer per-backend API trips it)


def main(argv: list[str] | None = None) -> None:
    if argv is None and "--debug" in sys.argv:
        sys.argv.remove("--debug")  # the command line that DDP re-launches for the other ranks
        os.environ[DEBUG] = "1"  # which they inherit
    elif argv is not None and "--debug" in argv:
        argv = [arg for arg in argv if arg != "--debug"]
        os.environ[DEBUG] = "1"
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if args[0] not in COMMANDS:
        raise SystemExit(f"sagsae: unknown command {args[0]!r}\n\n{usage()}")
    args = with_shipped_configs(args)
    if argv is None:
        sys.argv[1:] = args  # what the LightningCLI reads, and what DDP re-launches for the other ranks
    else:
        argv = args
    configure_torch()
    keep_freed_memory()
    try:
        module = importlib.import_module(COMMANDS[args[0]][0])  # Lightning loads only with a command that needs it
        if COMMANDS[args[0]][0] == TRAIN:
            module.run(argv)  # None: LightningCLI reads the command line itself (and DDP re-launches it unchanged)
        else:
            module.main(args[1:])
        end_process_group()  # after a run that ended normally; a failing rank's exit code says enough
    except USER_ERRORS as error:
        if os.environ.get(DEBUG) == "1":
            raise
        raise SystemExit(f"sagsae {args[0]}: {one_line(error)} (--debug shows the traceback)") from None


if __name__ == "__main__":
    main()
