"""Several hookpoints from one LM forward in a live sweep: each site's batches, scales and spliced LM loss equal
those of its hookpoint alone, and a `one_forward` sweep trains every cell as it would train apart."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import yaml

from datamodules import LMActivationDataModule
from sagsae.__main__ import main

SITES = [("mlp_out", 2), ("attn_out", 2), ("resid_mid", 1)]


def live_data(tiny_llama, text_file, **overrides) -> LMActivationDataModule:
    arguments = {"layer": 2, "context_length": 32, "lm_batch_size": 16, "val_fraction": 0.1, "batch_size": 128,
                 "shuffle_buffer_tokens": 512, "val_tokens": 256, "normalization_tokens": 256,
                 "norm_guard_multiple": None, **overrides}
    data = LMActivationDataModule(model=str(tiny_llama), dataset="json", data_files=str(text_file), **arguments)
    data.setup()
    return data


def test_each_site_of_one_forward_equals_its_hookpoint_alone(tiny_llama, text_file):
    together = live_data(tiny_llama, text_file, more_hookpoints=[list(site) for site in SITES[1:]])
    assert together.sites == 3 and together.describe()["more_hookpoints"] == [["attn_out", 2], ["resid_mid", 1]]
    batches = list(itertools.islice(together.training_batches(), 3))
    assert batches[0].shape == (128, 3, together.d_model)
    scales, held_out = together.estimate_scales(), together.held_out_rows()
    assert len(scales) == 3 and len(set(scales)) == 3  # the sites differ, so the test can fail
    for site, (hookpoint, layer) in enumerate(SITES):
        alone = live_data(tiny_llama, text_file, hookpoint=hookpoint, layer=layer)
        for mine, theirs in zip(batches, itertools.islice(alone.training_batches(), 3)):
            assert torch.equal(mine[:, site], theirs), (hookpoint, layer)
        assert scales[site] == pytest.approx(alone.estimate_scales()[0], rel=1e-6)
        assert torch.equal(held_out[:, site], alone.held_out_rows())
        spliced = together.spliced_cross_entropy(lambda x: 0.5 * x, contexts=4, site=site)
        assert spliced == pytest.approx(alone.spliced_cross_entropy(lambda x: 0.5 * x, contexts=4), rel=1e-6)
        assert spliced["ce_delta"] != 0
    with pytest.raises(ValueError, match="No site 3"):
        together.spliced_cross_entropy(lambda x: x, contexts=4, site=3)


def test_more_hookpoints_refuse_a_transcoder_and_a_malformed_site(tiny_llama, text_file):
    with pytest.raises(ValueError, match="drop data.target_hookpoint"):
        LMActivationDataModule(model=str(tiny_llama), hookpoint="mlp_in", target_hookpoint="mlp_out",
                               more_hookpoints=[["attn_out", 2]])
    with pytest.raises(ValueError, match=r"\[hookpoint, layer\] pairs"):
        LMActivationDataModule(model=str(tiny_llama), more_hookpoints=["attn_out"])


def sweep_config(tiny_llama, text_file, one_forward: bool) -> dict:
    data = {"model": str(tiny_llama), "dataset": "json", "data_files": str(text_file), "context_length": 32,
            "lm_batch_size": 16, "val_fraction": 0.1, "batch_size": 128, "shuffle_buffer_tokens": 512,
            "val_tokens": 256, "normalization_tokens": 256, "norm_guard_multiple": None}
    cells = {f"{hookpoint}_{layer}": {"class_path": "datamodules.LMActivationDataModule",
                                      "init_args": {**data, "hookpoint": hookpoint, "layer": layer}}
             for hookpoint, layer in SITES[:2]}
    return {"one_forward": one_forward, "trainer": {"max_steps": 4, "val_check_interval": 2},
            "lm_loss": {"contexts": 4, "every": 1}, "cells": cells,
            "members": [{"name": "SA", "sae": "sagsae", "init_args": {"width": 16, "target_l0": 4, "init_seed": 0}},
                        {"name": "T", "sae": "topk", "init_args": {"width": 16, "k": 3, "init_seed": 1}}]}


def test_a_one_forward_sweep_trains_each_cell_as_it_trains_apart(tiny_llama, text_file, tmp_path, capsys):
    outs = {}
    for one_forward in (True, False):
        path = tmp_path / f"sweep_{one_forward}.yaml"
        path.write_text(yaml.safe_dump(sweep_config(tiny_llama, text_file, one_forward), sort_keys=False))
        outs[one_forward] = tmp_path / f"out_{one_forward}"
        main(["sweep", "--config", str(path), "--out", str(outs[one_forward])])
    assert "2 cells from one forward: mlp_out_2, attn_out_2" in capsys.readouterr().out
    assert (outs[True] / "mlp_out_2+attn_out_2/checkpoints/last.ckpt").is_file()
    for cell, (hookpoint, layer) in zip(["mlp_out_2", "attn_out_2"], SITES):
        together = json.loads((outs[True] / cell / "results.json").read_text())
        apart = json.loads((outs[False] / cell / "results.json").read_text())
        assert (together["activations"]["hookpoint"], together["activations"]["layer"]) == (hookpoint, layer)
        assert together["activations"]["one_forward_with"] == [c for c in ["mlp_out_2", "attn_out_2"] if c != cell]
        assert together["members"].keys() == apart["members"].keys() == {"SA", "T"}
        for name, member in together["members"].items():
            for key in ("l0", "r2", "mse", "ce_delta", "sparsity_coefficient", "tokens_seen"):
                assert member[key] == pytest.approx(apart["members"][name][key], rel=1e-5, abs=1e-7), (cell, name, key)
    r2 = [json.loads((outs[True] / cell / "results.json").read_text())["members"]["T"]["r2"]
          for cell in ("mlp_out_2", "attn_out_2")]
    assert r2[0] != r2[1], "the two cells train on different activations"
    extended = tmp_path / "out_extended"  # 2 steps, then extended to 4 from the group's checkpoint
    for steps in (2, 4):
        main(["sweep", "--config", str(tmp_path / "sweep_True.yaml"), "--out", str(extended), "--max_steps", str(steps)])
    assert "[mlp_out_2+attn_out_2] extending from 2 steps" in capsys.readouterr().out
    for cell in ("mlp_out_2", "attn_out_2"):
        once = json.loads((outs[True] / cell / "results.json").read_text())["members"]
        again = json.loads((extended / cell / "results.json").read_text())["members"]
        assert (extended / cell / "results.step2.json").is_file()
        for name in once:
            assert again[name]["r2"] == pytest.approx(once[name]["r2"], abs=1e-6), (cell, name)
            assert again[name]["history"] == once[name]["history"], (cell, name)


def test_one_forward_refuses_a_group_that_is_only_partly_finished(tiny_llama, text_file, tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_config(tiny_llama, text_file, True), sort_keys=False))
    (tmp_path / "out/mlp_out_2").mkdir(parents=True)
    (tmp_path / "out/mlp_out_2/results.json").write_text("{}")
    with pytest.raises(SystemExit, match="only \\['mlp_out_2'\\] are finished"):
        main(["sweep", "--config", str(path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out/attn_out_2").exists(), "nothing trains before the refusal"
