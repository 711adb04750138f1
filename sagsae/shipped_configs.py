"""The configs that ship with sagsae: `--config default` (or `sweeps/synth`, `paper/pythia1b_mlp_out`, …) names
one of them wherever no file of that name exists, so a pip-installed user can start from the shipped default."""

from __future__ import annotations

from pathlib import Path

CONFIG_FLAG = "--config"


def shipped_config_folder() -> Path:
    """`sagsae/configs/` in an installed wheel (pyproject.toml maps it there), the checkout's `configs/` else."""
    installed = Path(__file__).resolve().parent / "configs"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[1] / "configs"


def shipped_config_names() -> list[str]:
    """Every shipped config by the name `--config` takes: its path under the folder, without `.yaml`."""
    folder = shipped_config_folder()
    return sorted(str(path.relative_to(folder).with_suffix("")) for path in folder.rglob("*.yaml"))


def resolve_config(value: str) -> str:
    """`value` itself when it is a file (or not a shipped name), else the shipped config it names."""
    if Path(value).exists():
        return value
    for candidate in (value, f"{value}.yaml"):
        shipped = shipped_config_folder() / candidate
        if shipped.is_file():
            return str(shipped)
    return value


def with_shipped_configs(args: list[str]) -> list[str]:
    """The command line with each `--config NAME` (or `--config=NAME`) that names a shipped config made a path."""
    resolved = list(args)
    for i, arg in enumerate(resolved):
        if arg == CONFIG_FLAG and i + 1 < len(resolved):
            resolved[i + 1] = resolve_config(resolved[i + 1])
        elif arg.startswith(f"{CONFIG_FLAG}="):
            resolved[i] = f"{CONFIG_FLAG}={resolve_config(arg.partition('=')[2])}"
    return resolved
