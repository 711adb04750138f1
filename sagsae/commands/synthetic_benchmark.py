"""`python -m sagsae synth --config configs/sweeps/synth.yaml`: the synthetic signed-axis benchmark (Protocols A–C,
and the hierarchy H of configs/sweeps/synth_hierarchy.yaml).

Writes each protocol's samples as an activation cache (`<out>/data/<cell>/{train,val}/…safetensors`, with the
ground truth in `truth.safetensors`), trains the config's members on every cell as one sweep, and adds the
ground-truth scores to each cell's results.json: recovery of the signed features, bipolar sharing, true L0, and
for a hierarchy the absorption score.
Reruns reuse the written data and skip finished cells. Summarize with `python -m sagsae report <out>`.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from datamodules.activation_cache import ShardWriter
from datamodules.activation_files import METADATA
from sagsae.analysis import synthetic
from sagsae.formats.staging import staged_folder
from sagsae.commands.sweep import run_sweep, sweep_command

TRUTH = "truth.safetensors"
PROTOCOLS = {"a": synthetic.protocol_a, "b": synthetic.protocol_b, "c": synthetic.protocol_c,
             "h": synthetic.protocol_h}


def write_protocol(folder: Path, spec: dict[str, Any], shared: dict[str, Any]) -> None:
    """One protocol's train/val samples as shards, its ground truth, and what was asked in metadata.json."""
    if folder.exists():
        return
    spec = dict(spec)
    protocol = spec.pop("protocol").lower()
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {protocol!r}: use one of {sorted(PROTOCOLS)}")
    n_train, n_val = int(shared["n_train"]), int(shared["n_val"])
    accepted = inspect.signature(PROTOCOLS[protocol]).parameters  # the hierarchy takes parents, not axes
    options = {key: shared[key] for key in ("d", "axes", "p", "noise", "seed") if key in shared and key in accepted}
    options |= spec
    data = PROTOCOLS[protocol](n_train + n_val, **options)
    with staged_folder(folder) as staging:
        for split, rows in (("train", data.activations[:n_train]), ("val", data.activations[n_train:])):
            writer = ShardWriter(staging / split, shard_tokens=n_train, dtype=torch.float32)
            writer.add(rows)
            writer.close()
        truth = {"directions": data.directions, "val_coefficients": data.coefficients[n_train:].contiguous()}
        if data.parent_of is not None:
            truth["parent_of"] = data.parent_of
        save_file(truth, str(staging / TRUTH))
        metadata = {"protocol": protocol, **options, "n_train": n_train, "n_val": n_val, "true_l0": data.true_l0}
        if data.positive is not None:
            metadata["pair_correlation"] = synthetic.pair_correlation(data)
        (staging / METADATA).write_text(json.dumps(metadata, indent=2))


def run_synth(config: dict[str, Any], out: Path, cells: list[str] | None = None) -> None:
    shared = config.get("synthetic") or {}
    protocols = shared.get("protocols") or {}
    if not protocols:
        raise ValueError("The synth config needs synthetic.protocols (cell name → {protocol: a|b|c, …})")
    batch_size = int(shared.get("batch_size", 4096))
    sweep_cells = {}
    for cell, spec in protocols.items():
        write_protocol(out / "data" / cell, spec, shared)
        sweep_cells[cell] = {"class_path": "datamodules.ActivationFileDataModule",
                             "init_args": {"path": str(out / "data" / cell), "batch_size": batch_size,
                                           "val_tokens": int(shared["n_val"]), "seed": int(config.get("seed", 0))}}
    truths = {cell: load_file(str(out / "data" / cell / TRUTH)) for cell in protocols}
    validation = {cell: load_file(str(next((out / "data" / cell / "val").glob("*.safetensors"))))
                  for cell in protocols}

    def scorer(cell: str, member) -> dict[str, float]:
        activations = next(iter(validation[cell].values()))
        return synthetic.score_against_truth(member.sae.cpu().eval(), activations, truths[cell]["val_coefficients"],
                                             truths[cell]["directions"], truths[cell].get("parent_of"))

    run_sweep({**config, "cells": sweep_cells}, out, cells, scorer)


def main(argv: list[str] | None = None) -> None:
    sweep_command("synth", __doc__, Path("configs/sweeps/synth.yaml"), argv, run_synth)
