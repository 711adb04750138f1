"""`sagsae configs`: list the configs that ship with sagsae, or copy them into a folder to edit
(`sagsae configs --out my_configs`). Any command's `--config NAME` takes a shipped name directly."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from sagsae.shipped_configs import shipped_config_folder, shipped_config_names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sagsae configs", description=__doc__)
    parser.add_argument("--out", help="copy every shipped config into this new folder")
    args = parser.parse_args(argv)
    if args.out is None:
        print(f"Shipped configs (in {shipped_config_folder()}); pass one as --config NAME:")
        for name in shipped_config_names():
            print(f"  {name}")
        return
    out = Path(args.out)
    if out.exists():
        raise FileExistsError(f"--out {out} already exists: name a new folder")
    shutil.copytree(shipped_config_folder(), out, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    print(f"Copied {len(shipped_config_names())} configs into {out}; train with: sagsae fit --config {out / 'default.yaml'}")
