"""`python -m sagsae sweep --config SWEEP.yaml`: a grid of SAEs, trained together on each cell's activations.

A sweep config names its output folder, the trainer settings, the cells (one datamodule each: a cache folder
or a live hookpoint) and the members (an SAE module, its fixed arguments, and a grid of swept ones):

    out: runs/sweeps/smollm2_l15
    trainer: {max_steps: 2000, val_check_interval: 500}
    cells:
      mlp_out: {class_path: datamodules.ActivationFileDataModule, init_args: {path: cache/smollm2_l15_mlp_out}}
    members:
      - name: SA-GSAE(H)
        sae: sagsae          # a registered architecture's name, or an import path to an SAE class
        init_args: {width: 1152, lr_warmup_steps: 10}
        grid: {sparsity_coefficient: [4, 8, 16, 32], init_seed: [0, 1]}

`one_forward: true` trains live cells that differ only in hookpoint and layer from one LM forward per batch
(their data's `more_hookpoints`): each member sees its own cell's activations, exactly as that cell alone would
give them with the norm guard off (with it on, a token is dropped from every site at once). Their checkpoints
and TensorBoard logs share the folder `<out>/<cell>+<cell>…`; each cell still writes its own results.json.

`lm_loss: {contexts: 256, every: 2}` adds the spliced LM loss (ΔCE, CE recovered) on that many held-out contexts to
every 2nd validation and the last, for cells whose data knows its LM (a live hookpoint, or a cache that names it).

A member's `init_args` and `grid` are one flat set of arguments: those of `SAEModule` (λ, LR, seeds, …) train,
the others configure the SAE (width, k, switches), each routed by its name (`TrainingPlan.from_arguments`).

Every member of a cell trains from the same batches (`SweepModule`), so a cell costs one pass over its data.
Each cell writes `<out>/<cell>/results.json` when done; a rerun skips finished cells and resumes an unfinished
one from its newest checkpoint (last.ckpt after every validation, or interrupted.ckpt). A rerun with a larger
`--max_steps` extends a finished cell from its checkpoint to the longer budget, exactly as one longer run would
train (a constant LR: with `lr_decay_fraction` > 0 the schedule depends on max_steps, so it is refused); the
shorter run's results stay beside it as `results.step<N>.json`.

A sweep splits across processes or machines with `--cells`, `--series` and `--only` (grid points such as
`target_l0=20`: members are independent, so a split run trains as the joint one), and grows by a seed with
`--seeds 2 --out <new folder>`; `python -m sagsae report` merges the same-named cells of several output folders.
Every member of a cell sees the same batches, so seeds of one run differ in their initialization only; a run
with `--data_seed N` (every cell's datamodule `seed`) varies the data order too, and `--seeds N --data_seed N
--out <folder N>` per seed gives seeds that differ in both.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.trainer.states import TrainerFn

from callbacks.checkpoint_io import AtomicCheckpointIO
from callbacks.dashboard import SAETensorBoardLogger
from callbacks.interrupt import InterruptCheckpoint
from callbacks.run_info import StepProgressBar, environment
from datamodules import LMActivationDataModule
from lightning_modules import SweepModule
from sagsae.analysis.sweep_results import RESULTS
from sagsae.formats.serialization import read_checkpoint
from sagsae.saes import SparseAutoencoder
from sagsae.training import TrainingPlan, TrainingState
Scorer = Callable[[str, TrainingState], dict[str, float]]  # (cell, trained member) → extra result columns
CLIPPING = ("gradient_clip_val", "gradient_clip_algorithm")  # trainer settings that the SweepModule applies
SHORT_NAMES = {"sparsity_coefficient": "l", "target_l0": "t", "init_seed": "s", "width": "w", "k": "k", "lr": "lr"}


def import_class(path: str) -> type:
    """The class at a dotted import path, with an error that names it."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"Cannot import {path!r} ({error}); write a full path such as "
                         f"datamodules.ActivationFileDataModule") from None


def member_sae(entry: dict[str, Any]) -> str | type[SparseAutoencoder]:
    """A member's `sae`: a registry name as it is, an import path as the class it names."""
    sae = str(entry["sae"])
    if "." not in sae:
        return sae
    cls = import_class(sae)
    if not (isinstance(cls, type) and issubclass(cls, SparseAutoencoder)):
        raise ValueError(f"{sae} is not a SparseAutoencoder class")
    return cls


def _identifier(label: str) -> str:
    """A member's folder- and module-safe name: 'SA-GSAE(H)-l0.5-s0' → 'SA-GSAE-H-l0p5-s0'."""
    name = "".join(c if c.isalnum() or c in "-_" else ("p" if c == "." else "-") for c in label)
    while "--" in name:
        name = name.replace("--", "-")
    return name.strip("-")


def expand_members(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name → {series, sae, init_args, grid point} for every point of every member's grid; each member is built
    here once, so that a wrong argument fails before any cell starts."""
    members: dict[str, dict[str, Any]] = {}
    for entry in entries:
        unknown = set(entry) - {"name", "sae", "init_args", "grid"}
        if unknown or "sae" not in entry or "name" not in entry:
            raise ValueError(f"A sweep member needs name and sae (and may have init_args, grid); got {entry}")
        sae = member_sae(entry)
        grid = entry.get("grid") or {}
        keys = list(grid)
        for values in itertools.product(*(grid[key] if isinstance(grid[key], list) else [grid[key]] for key in keys)):
            point = dict(zip(keys, values))
            name = _identifier(entry["name"] + "".join(f"-{SHORT_NAMES.get(k, k)}{v}" for k, v in point.items()))
            if name in members:
                raise ValueError(f"Two sweep members are both named {name!r}: give the entries distinct names")
            members[name] = {"series": entry["name"], "sae": sae,
                             "init_args": {**(entry.get("init_args") or {}), **point}, "point": point}
    if not members:
        raise ValueError("The sweep config lists no members")
    return members


def build_sweep(members: dict[str, dict[str, Any]], lm_loss: dict[str, int] | None = None,
                sites: dict[str, int] | None = None, **clipping: Any) -> SweepModule:
    """The members side by side; `lm_loss` ({contexts, every}) adds the spliced LM loss to their validations;
    `sites` places members on the hookpoints of one forward (SweepModule); `clipping` is the trainer's
    gradient_clip_val and gradient_clip_algorithm, which the sweep applies itself."""
    unknown = set(lm_loss or {}) - {"contexts", "every"}
    if unknown:
        raise ValueError(f"lm_loss takes contexts and every; got {sorted(unknown)}")
    return SweepModule({name: TrainingPlan.from_arguments(spec["sae"], **spec["init_args"]) for name, spec in members.items()},
                       lm_loss_contexts=int((lm_loss or {}).get("contexts", 0)),
                       lm_loss_every=int((lm_loss or {}).get("every", 1)), sites=sites, **clipping)


def cell_data_arguments(config: dict[str, Any], cell: str) -> dict[str, Any]:
    """A cell's datamodule arguments, with the sweep's `data_seed` if it has one."""
    seed = {"seed": config["data_seed"]} if "data_seed" in config else {}
    return {**(config["cells"][cell].get("init_args") or {}), **seed}


def forward_groups(config: dict[str, Any], cells: list[str]) -> list[list[str]]:
    """The cells in run order, grouped into what trains together: with `one_forward`, the live cells whose data
    differ only in hookpoint and layer; every other cell alone."""
    groups: dict[str, list[str]] = {}
    for cell in cells:
        key = cell
        if config.get("one_forward") and issubclass(import_class(config["cells"][cell]["class_path"]),
                                                     LMActivationDataModule):
            shared = {k: v for k, v in cell_data_arguments(config, cell).items() if k not in ("hookpoint", "layer")}
            key = json.dumps([config["cells"][cell]["class_path"], shared], sort_keys=True, default=str)
        groups.setdefault(key, []).append(cell)
    return list(groups.values())


def group_folder(out: Path, cells: list[str]) -> Path:
    """Where a group's checkpoints, progress and TensorBoard logs go (a lone cell's own folder)."""
    return out / "+".join(cells)


def group_data(config: dict[str, Any], cells: list[str]) -> L.LightningDataModule:
    """The datamodule of a group: a lone cell's own, or the first cell's reading the others' hookpoints too."""
    data_class = import_class(config["cells"][cells[0]]["class_path"])
    arguments = [cell_data_arguments(config, cell) for cell in cells]
    if len(cells) == 1:
        return data_class(**arguments[0])
    sites = [data_class(**args).hparams for args in arguments[1:]]  # their hookpoint and layer, defaults included
    return data_class(**arguments[0], more_hookpoints=[[site.hookpoint, site.layer] for site in sites])


def trainer_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The config's `trainer` over the sweep's defaults; the per-cell folder, logger and callbacks are the
    sweep's own. Each member's gradient norm is clipped at 1.0 unless the config says otherwise, as
    configs/default.yaml clips a `fit` (docs/method.md, "Gradient clipping")."""
    settings = {"max_steps": 1000, "val_check_interval": 250, "num_sanity_val_steps": 0, "gradient_clip_val": 1.0,
                **(config.get("trainer") or {})}
    owned = {"default_root_dir", "logger", "callbacks"} & set(settings)
    if owned:
        raise ValueError(f"A sweep sets trainer.{', trainer.'.join(sorted(owned))} itself (per cell): remove it")
    return settings


def _newest_checkpoint(folder: Path) -> Path | None:
    candidates = [path for path in folder.glob("*.ckpt") if path.name in ("last.ckpt", "interrupted.ckpt")]
    return max(candidates, key=lambda path: path.stat().st_mtime) if candidates else None


PROGRESS = "progress.json"  # a cell's budget history so far, rewritten after every validation of its fit


class CheckpointAfterValidation(L.Callback):
    """last.ckpt after every validation of a fit, so that it holds that validation's row of the budget history
    (the stream is one endless epoch); the trainer's AtomicCheckpointIO writes it whole or not at all. Beside it,
    the history so far as JSON (`PROGRESS`), readable while a long sweep runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        trainer.save_checkpoint(self.path)
        progress = self.path.parent.parent / PROGRESS
        partial = progress.with_suffix(".partial")
        partial.write_text(json.dumps({"steps": trainer.global_step, "history": pl_module.validation_history}))
        partial.replace(progress)


def site_description(described: dict[str, Any], cells: list[str], site: int) -> dict[str, Any]:
    """What a group's datamodule describes, as one cell's results record it: that cell's hookpoint and layer,
    and the cells it shared its forward with."""
    hookpoint, layer = [[described["hookpoint"], described["layer"]], *described["more_hookpoints"]][site]
    shared = {key: value for key, value in described.items() if key != "more_hookpoints"}
    return {**shared, "hookpoint": hookpoint, "layer": layer, "one_forward_with": cells[:site] + cells[site + 1:]}


def run_cells(config: dict[str, Any], cells: list[str], out: Path,
              scorer: Scorer | None = None) -> dict[str, dict[str, Any]]:
    """Train every member on the data of a cell, or of a `forward_groups` group of cells from one forward
    (resuming if a checkpoint exists), and write each cell's results.json; returns them by cell."""
    folder = group_folder(out, cells)
    datamodule = group_data(config, cells)
    members = expand_members(config["members"])
    grouped = len(cells) > 1  # a group's members are named <cell>/<member>
    placed = {f"{cell}/{name}" if grouped else name: (cell, name, site)
              for site, cell in enumerate(cells) for name in members}
    trainer_args = trainer_settings(config)
    clipping = {key: trainer_args.pop(key) for key in CLIPPING if key in trainer_args}
    sweep = build_sweep({key: members[name] for key, (_, name, _) in placed.items()}, config.get("lm_loss"),
                        {key: site for key, (_, _, site) in placed.items()} if grouped else None, **clipping)
    checkpoints = folder / "checkpoints"  # last.ckpt, and interrupted.ckpt (saved in the root folder)
    trainer = L.Trainer(**trainer_args, default_root_dir=checkpoints, enable_checkpointing=False,
                        logger=SAETensorBoardLogger(out, name=folder.name, version=""), plugins=[AtomicCheckpointIO()],
                        callbacks=[CheckpointAfterValidation(checkpoints / "last.ckpt"), StepProgressBar(),
                                   InterruptCheckpoint("the same sweep command resumes from it")])
    resume = _newest_checkpoint(checkpoints)
    if resume is not None:
        read_checkpoint(resume)  # tensors and plain data only: a crafted pickle is refused here, naming the file
        print(f"[{folder.name}] resuming from {resume}")
    elif grouped:
        print(f"[{folder.name}] {len(cells)} cells from one forward: {', '.join(cells)}")
    started = time.perf_counter()
    trainer.fit(sweep, datamodule, ckpt_path=resume, weights_only=True)  # plain data: a crafted pickle cannot run
    seconds = time.perf_counter() - started
    trainer.validate(sweep, datamodule, verbose=False)  # the held-out window, at the final weights
    described = datamodule.describe() if hasattr(datamodule, "describe") else None
    every = {}
    for site, cell in enumerate(cells):
        activations = site_description(described, cells, site) if grouped else described
        keys = {name: key for key, (owner, name, _) in placed.items() if owner == cell}  # member → sweep's name

        def result(name: str, spec: dict[str, Any]) -> dict[str, Any]:
            trained = sweep.members[keys[name]]
            return {"series": spec["series"], "architecture": trained.sae.architecture, "point": spec["point"],
                    "width": trained.sae.width, "history": sweep.validation_history.get(keys[name], []),
                    **sweep.latest_validation[keys[name]], **(scorer(cell, trained) if scorer is not None else {})}

        every[cell] = {"cell": cell, "activations": activations, "steps": trainer.global_step,
                       "fit_seconds_this_run": seconds,
                       "members": {name: result(name, spec) for name, spec in members.items()}}
        (out / cell).mkdir(parents=True, exist_ok=True)
        (out / cell / RESULTS).write_text(json.dumps(every[cell], indent=2))
    return every


def extend_finished_cells(config: dict[str, Any], out: Path, cells: list[str]) -> bool:
    """Whether finished cells (a lone cell or a one-forward group) train on to a larger max_steps. Their results
    move aside (`results.step<N>.json`) and the fit resumes from the last checkpoint, which holds the budget
    history so far."""
    finished = max(json.loads((out / cell / RESULTS).read_text())["steps"] for cell in cells)
    if trainer_settings(config)["max_steps"] <= finished:
        return False
    folder = group_folder(out, cells)
    checkpoint = folder / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise ValueError(f"{folder.name} is done at {finished} steps, but {checkpoint} is gone, so it cannot "
                         f"be extended: run it afresh in another --out folder")
    decaying = sorted(name for name, spec in expand_members(config["members"]).items()
                      if float(spec["init_args"].get("lr_decay_fraction", 0)) > 0)
    if decaying:
        raise ValueError(f"{decaying} decay the LR over the last share of max_steps, so {folder} cannot be extended "
                         f"exactly: run the longer budget afresh in another --out folder")
    for cell in cells:
        (out / cell / RESULTS).replace(out / cell / f"results.step{finished}.json")
    print(f"[{folder.name}] extending from {finished} steps")
    return True


def run_sweep(config: dict[str, Any], out: Path, cells: list[str] | None = None, scorer: Scorer | None = None) -> None:
    for key in ("cells", "members"):
        if not config.get(key):
            raise ValueError(f"The sweep config needs a non-empty {key!r} section")
    build_sweep(expand_members(config["members"]), config.get("lm_loss"))  # reject bad members before any cell starts
    trainer_settings(config)
    unknown = sorted(set(cells or []) - set(config["cells"]))
    if unknown:
        raise ValueError(f"Unknown cell(s) {unknown}; this sweep's cells: {sorted(config['cells'])}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(yaml.safe_dump({**config, "trainer": trainer_settings(config)}, sort_keys=False))
    (out / "environment.json").write_text(json.dumps(environment(), indent=2))
    groups = forward_groups(config, cells or list(config["cells"]))
    for group in groups:
        finished = [cell for cell in group if (out / cell / RESULTS).is_file()]
        if finished and len(finished) < len(group):
            raise ValueError(f"one_forward trains {group} together, but only {finished} are finished in {out}: "
                             f"run the others apart with --cells, or in a new --out folder")
    L.seed_everything(int(config.get("seed", 0)), workers=True)
    for group in groups:
        if (out / group[0] / RESULTS).is_file() and not extend_finished_cells(config, out, group):
            print(f"[{'+'.join(group)}] done already ({out / group[0] / RESULTS}); skipped")
            continue
        for cell, results in run_cells(config, group, out, scorer).items():
            print(f"[{cell}] {len(results['members'])} SAEs, {results['steps']} steps: {out / cell / RESULTS}")


def select(config: dict[str, Any], series: list[str] | None, seeds: list[int] | None,
           only: list[str] | None = None) -> dict[str, Any]:
    """The config with only the named member series, every member's `init_seed` grid replaced by `seeds`, and
    each grid cut to the points that `only` names ("KEY=VALUE", e.g. target_l0=20: one job per point)."""
    members = config.get("members") or []
    if series:
        unknown = sorted(set(series) - {entry.get("name") for entry in members})
        if unknown:
            raise ValueError(f"Unknown series {unknown}; this sweep's series: {[entry.get('name') for entry in members]}")
        members = [entry for entry in members if entry.get("name") in series]
    if seeds:
        members = [{**entry, "grid": {**(entry.get("grid") or {}), "init_seed": seeds}} for entry in members]
    for point in only or []:
        key, separator, text = point.partition("=")
        if not separator:
            raise ValueError(f"--only takes KEY=VALUE (e.g. target_l0=20); got {point!r}")
        value = yaml.safe_load(text)
        for entry in members:
            values = (entry.get("grid") or {}).get(key)
            if value not in (values if isinstance(values, list) else [values]):
                raise ValueError(f"--only {point}: series {entry.get('name')!r} has no grid point {key}={text} "
                                 f"(its grid: {entry.get('grid') or {}}); pick its series with --series")
        members = [{**entry, "grid": {**(entry.get("grid") or {}), key: [value]}} for entry in members]
    return {**config, "members": members}


def sweep_command(command: str, description: str, default_config: Path | None, argv: list[str] | None,
                  run: Callable[[dict[str, Any], Path, list[str] | None], None]) -> None:
    """The command line shared by `sweep` and `synth`: --config, --out, --cells, --series, --seeds, --only,
    --data_seed, --max_steps."""
    parser = argparse.ArgumentParser(prog=f"sagsae {command}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=default_config, required=default_config is None,
                        help="a sweep config (see configs/sweeps/)")
    parser.add_argument("--out", type=Path, help="output folder (default: the config's `out`)")
    parser.add_argument("--cells", nargs="+", help="run only these cells")
    parser.add_argument("--series", nargs="+", help="run only these members (their `name`s)")
    parser.add_argument("--seeds", nargs="+", type=int, help="replace every member's init_seed grid by these seeds")
    parser.add_argument("--only", nargs="+", metavar="KEY=VALUE",
                        help="run only the grid points with these values (e.g. target_l0=20), one job per point")
    parser.add_argument("--data_seed", type=int, help="the data order's seed (every cell's datamodule `seed`)")
    parser.add_argument("--max_steps", type=int, help="override trainer.max_steps")
    args = parser.parse_args(argv)
    if not args.config.is_file():
        parser.error(f"--config {args.config} does not exist")
    config = yaml.safe_load(args.config.read_text()) or {}
    if args.data_seed is not None:
        config["data_seed"] = args.data_seed
    if args.max_steps is not None:
        config["trainer"] = {**(config.get("trainer") or {}), "max_steps": args.max_steps}
    out = args.out or (Path(config["out"]) if config.get("out") else None)
    if out is None:
        parser.error("name the output folder with --out or the config's `out`")
    run(select(config, args.series, args.seeds, args.only), out, args.cells)  # bad input: one line from the front door


def main(argv: list[str] | None = None) -> None:
    sweep_command("sweep", __doc__, None, argv, run_sweep)
