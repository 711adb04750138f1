"""The commands of `sagsae` (and `python -m sagsae`): the top layer, which may import every other."""

from __future__ import annotations

TRAIN = "sagsae.commands.train"  # the LightningCLI, which takes the whole command line itself

# command → (module with a `main(argv)`, one line for the top-level help)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": (TRAIN, "train an SAE on activations (live from an LM or cached), with validation"),
    "validate": (TRAIN, "evaluate a checkpoint on held-out activations, writing metrics.json"),
    "test": (TRAIN, "the same as validate, logged under test/"),
    "cache": ("sagsae.commands.cache", "run the LM once and store its activations as safetensors shards"),
    "sweep": ("sagsae.commands.sweep", "train a grid of SAEs together on each cell's activations (resumable)"),
    "synth": ("sagsae.commands.synthetic_benchmark", "the synthetic signed-axis benchmark, scored against the truth"),
    "report": ("sagsae.commands.report", "tables, plots and Pareto verdicts from sweep folders"),
    "export": ("sagsae.commands.export", "write a checkpoint's SAE as a SAELens folder with a model card"),
    "inspect": ("sagsae.commands.inspect", "a feature browser of a trained SAE: contexts of each latent, by sign"),
    "params": ("sagsae.commands.params", "parameter counts per architecture and the widths that match"),
    "configs": ("sagsae.commands.configs", "list the shipped configs (--config NAME takes them), or copy them out"),
}


def end_process_group() -> None:
    """Destroy the process group a DDP run left behind (Lightning's teardown keeps it). Left to the interpreter's
    exit, gloo's worker threads can be torn down while still joinable, and a run that succeeded then dies with
    SIGABRT ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
