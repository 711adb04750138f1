"""`sagsae cache` writes shards + metadata; ActivationFileDataModule trains from them (and from one file)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from datamodules import ActivationFileDataModule, LMActivationDataModule
from datamodules.activation_cache import write_cache, write_caches
from datamodules.activation_files import KEY, leading_rows
from sagsae.commands.train import run
from tests.test_cli import REPO


def test_cache_writes_shards_and_metadata(cache_dir):
    metadata = json.loads((cache_dir / "metadata.json").read_text())
    assert metadata["train_tokens"] == 3000 and metadata["train_shards"] == 3
    assert metadata["val_tokens"] == 400 and metadata["hookpoint"] == "mlp_out" and metadata["layer"] == 2
    shards = sorted((cache_dir / "train").glob("*.safetensors"))
    rows = torch.cat([load_file(str(s))["activations"] for s in shards])
    assert rows.shape == (3000, 32) and torch.isfinite(rows).all()
    assert metadata["normalization_scale"] == pytest.approx(math.sqrt(32 / rows.double().pow(2).sum(1).mean()), rel=1e-4)


def test_cache_reports_progress_once_per_shard(tiny_llama, text_file, tmp_path, capsys):
    """A cache of millions of tokens runs for tens of minutes: each written shard prints where it stands."""
    data = LMActivationDataModule(model=str(tiny_llama), dataset="json", data_files=str(text_file), layer=2,
                                  context_length=32, lm_batch_size=16, val_fraction=0.1)
    write_cache(data, tmp_path / "cache", train_tokens=3000, val_tokens=400, shard_tokens=1000, dtype="float32")
    progress = [line.split(" train tokens")[0] for line in capsys.readouterr().err.splitlines()
                if line.startswith("cached ")]
    assert progress == ["cached 1,000 of 3,000", "cached 2,000 of 3,000", "cached 3,000 of 3,000"]


def test_several_hookpoints_from_one_forward_equal_their_caches_alone(tiny_llama, text_file, tmp_path):
    """`cache --hookpoints … --layers …` writes one folder per (hookpoint, layer) from one forward; each holds the
    same shards, normalization scalar and drop counts as the cache of that hookpoint alone."""
    from sagsae.commands.cache import output_folders, requested_hookpoints

    def data(**overrides) -> LMActivationDataModule:
        arguments = {"layer": 2, **overrides}
        return LMActivationDataModule(model=str(tiny_llama), dataset="json", data_files=str(text_file),
                                      context_length=32, lm_batch_size=16, val_fraction=0.1, norm_guard_multiple=1.5,
                                      **arguments)

    several = data()
    hookpoints = requested_hookpoints(["mlp_out", "attn_out", "blocks.1.hook_resid_mid"], [2, 3], several)
    assert hookpoints == [("mlp_out", 2), ("mlp_out", 3), ("attn_out", 2), ("attn_out", 3), ("resid_mid", 1)]
    outs = output_folders(str(tmp_path / "l{layer}_{hookpoint}"), hookpoints)
    records = write_caches(several, outs, hookpoints, train_tokens=1500, val_tokens=300, shard_tokens=1000,
                           dtype="float32")
    assert any(record["dropped_massive"] > 0 for record in records)  # the guard acts, so each must keep its own
    for (hookpoint, layer), out, record in zip(hookpoints, outs, records):
        alone = tmp_path / f"alone_{hookpoint}_{layer}"
        expected = write_cache(data(hookpoint=hookpoint, layer=layer), alone, train_tokens=1500, val_tokens=300,
                               shard_tokens=1000, dtype="float32")
        assert record == expected == json.loads((out / "metadata.json").read_text())
        for split in ("train", "val"):
            mine, theirs = sorted((out / split).glob("*")), sorted((alone / split).glob("*"))
            assert [path.name for path in mine] == [path.name for path in theirs]
            for a, b in zip(mine, theirs):
                assert torch.equal(load_file(str(a))[KEY], load_file(str(b))[KEY]), (hookpoint, layer, a.name)


def test_several_hookpoints_need_a_folder_pattern_that_tells_them_apart(tmp_path):
    from sagsae.commands.cache import output_folders

    with pytest.raises(ValueError, match="one folder"):
        output_folders(str(tmp_path / "cache"), [("mlp_out", 2), ("attn_out", 2)])
    with pytest.raises(ValueError, match="one folder"):
        output_folders(str(tmp_path / "{hookpoint}"), [("mlp_out", 2), ("mlp_out", 3)])
    assert output_folders(str(tmp_path / "c"), [("mlp_out", 2)]) == [tmp_path / "c"]


def test_leading_rows_take_the_first_finite_rows_across_shards(tmp_path):
    rows = torch.randn(10, 2, 4)
    rows[1, 0, 2] = math.nan
    rows[6, 1, 0] = math.inf
    shards = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    save_file({KEY: rows[:4].half()}, str(shards[0]))
    save_file({KEY: rows[4:].half()}, str(shards[1]))
    finite = rows.half().float()[[0, 2, 3, 4, 5, 7, 8, 9]]
    taken = leading_rows(shards, 6)
    assert taken.dtype == torch.float32 and torch.equal(taken, finite[:6])
    assert torch.equal(leading_rows(shards, 100), finite)


def test_file_datamodule_batches_normalization_and_ddp_shards(cache_dir):
    data = ActivationFileDataModule(str(cache_dir), batch_size=250, shuffle_buffer_tokens=1000)
    assert data.d_model == 32 and len(data.val_shards) == 1
    batches = [b for _, b in zip(range(12), data.batches())]
    assert all(b.shape == (250, 32) for b in batches)
    assert data.estimate_scales() == pytest.approx(
        [json.loads((cache_dir / "metadata.json").read_text())["normalization_scale"]], rel=1e-3)

    class FakeTrainer:
        world_size = 2

        def __init__(self, rank):
            self.global_rank = rank

    seen = []
    for rank in (0, 1):
        data.trainer = FakeTrainer(rank)
        seen.append(torch.cat([data.rows(s) for s in data.shards[rank::2]]))
    data.trainer = None
    assert len(seen[0]) + len(seen[1]) == 3000
    assert not (torch.cdist(seen[0][:200], seen[1][:200]) == 0).any(), "ranks must read disjoint shards"


def test_fit_from_cache_and_from_a_single_file(cache_dir, tmp_path):
    single = tmp_path / "acts.safetensors"
    save_file({"activations": load_file(str(sorted((cache_dir / "train").glob("*"))[0]))["activations"]}, str(single))
    for index, path in enumerate((cache_dir, single)):
        root = tmp_path / f"run{index}"
        run(["fit", "--config", str(REPO / "configs" / "default.yaml"), "--trainer.max_steps", "8",
             "--trainer.val_check_interval", "4", "--trainer.default_root_dir", str(root),
             "--model.sae.width", "64", "--data", "datamodules.ActivationFileDataModule",
             "--data.init_args.path", str(path), "--data.init_args.batch_size", "200",
             "--data.init_args.shuffle_buffer_tokens", "800", "--data.init_args.normalization_tokens", "500"])
        state = torch.load(root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
        assert state["global_step"] == 8 and state["sae"]["config"]["d_in"] == 32


def test_bad_paths_and_tensors_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ActivationFileDataModule(str(tmp_path / "missing"))
    save_file({"x": torch.zeros(4, 3)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match="no 'activations' tensor"):
        ActivationFileDataModule(str(tmp_path / "wrong.safetensors"))


def damaged_copy(cache_dir, folder, damage) -> str:
    """A copy of the cache with `damage(copy)` applied."""
    import shutil

    copy = folder / "damaged"
    shutil.copytree(cache_dir, copy)
    damage(copy)
    return str(copy)


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("fault, damage, message", [
    ("truncated shard", lambda c: truncate(c / "train" / "shard-00001.safetensors"),
     r"train/shard-00001\.safetensors is not a readable safetensors shard"),
    ("missing shard", lambda c: (c / "train" / "shard-00002.safetensors").unlink(),
     r"train holds 2 shards where .*metadata\.json says 3"),
    ("shard of another width", lambda c: save_file({"activations": torch.zeros(1000, 16, dtype=torch.float16)},
                                                  str(c / "train" / "shard-00000.safetensors")),
     r"disagree on the activation size: \[16, 32\]"),
    ("shard of another dtype", lambda c: save_file({"activations": torch.zeros(1000, 32, dtype=torch.bfloat16)},
                                                  str(c / "train" / "shard-00000.safetensors")),
     r"shard-00000\.safetensors has activation dtype bfloat16 where .*metadata\.json says float"),
    ("corrupt held-out shard", lambda c: truncate(next((c / "val").glob("*.safetensors"))),
     r"val/shard-00000\.safetensors is not a readable safetensors shard"),
    ("missing metadata", lambda c: (c / "metadata.json").unlink(), r"metadata\.json is missing"),
])
def test_a_damaged_cache_fails_naming_the_file_before_training(fault, damage, message, cache_dir, tmp_path):
    path = damaged_copy(cache_dir, tmp_path, damage)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ActivationFileDataModule(path)


def test_a_damaged_cache_ends_fit_in_one_line(cache_dir, tmp_path):
    from sagsae.__main__ import main

    path = damaged_copy(cache_dir, tmp_path, lambda c: truncate(c / "train" / "shard-00000.safetensors"))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / "default.yaml"), "--trainer.default_root_dir",
              str(tmp_path / "run"), "--data", "datamodules.ActivationFileDataModule", "--data.init_args.path", path])
    assert "shard-00000.safetensors is not a readable safetensors shard" in exit_info.value.code
    assert "\n" not in exit_info.value.code and not (tmp_path / "run").exists()


def test_resume_from_cache_continues_the_stream_exactly(cache_dir, tmp_path):
    """6 steps, then resume to 10, gives the same weights as 10 steps straight: same batches, same order."""
    def fit(root, steps, ckpt=None):
        args = ["fit", "--config", str(REPO / "configs" / "default.yaml"), "--trainer.max_steps", str(steps),
                "--trainer.val_check_interval", "100", "--trainer.limit_val_batches", "0",
                "--trainer.default_root_dir", str(root), "--model.sae.width", "64",
                "--data", "datamodules.ActivationFileDataModule", "--data.init_args.path", str(cache_dir),
                "--data.init_args.batch_size", "200", "--data.init_args.shuffle_buffer_tokens", "1500",
                "--data.init_args.normalization_tokens", "500"]
        run(args + (["--ckpt_path", str(ckpt)] if ckpt else []))
        versions = sorted((root / "lightning_logs").iterdir())
        return versions[-1] / "checkpoints" / "last.ckpt"

    straight = torch.load(fit(tmp_path / "straight", 10), weights_only=False)
    first = fit(tmp_path / "split", 6)
    assert torch.load(first, weights_only=False)["ActivationFileDataModule"]["batches_consumed"] == 6
    resumed = torch.load(fit(tmp_path / "split", 10, ckpt=first), weights_only=False)
    assert resumed["global_step"] == straight["global_step"] == 10
    for name, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], value, rtol=0, atol=0, msg=name)
    # a plain fresh 10-step stream differs from one that skipped its first 6 batches: the test can fail
    data = ActivationFileDataModule(str(cache_dir), batch_size=200, shuffle_buffer_tokens=1500)
    fresh = [b for _, b in zip(range(10), data.batches())]
    data.load_state_dict({"batches_consumed": 6})
    assert torch.equal(next(data.batches()), fresh[6])


def test_a_sweep_from_a_cache_scores_every_members_lm_loss(cache_dir, tmp_path, monkeypatch):
    """The cache names its LM and held-out documents, so a sweep cell on it adds ΔCE and CE recovered to every
    `every`-th budget checkpoint and to the final row, per member, once; the same SAE scores what a live fit would."""
    import yaml

    from sagsae.__main__ import main

    config = {"trainer": {"max_steps": 6, "val_check_interval": 2}, "lm_loss": {"contexts": 4, "every": 2},
              "cells": {"c": {"class_path": "datamodules.ActivationFileDataModule",
                              "init_args": {"path": str(cache_dir), "batch_size": 200, "shuffle_buffer_tokens": 800,
                                            "normalization_tokens": 500}}},
              "members": [{"name": "SA", "sae": "sagsae", "init_args": {"width": 16, "init_seed": 0}},
                          {"name": "G", "sae": "gated", "init_args": {"width": 16, "init_seed": 1}}]}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    scored_contexts = []
    splice = ActivationFileDataModule.spliced_cross_entropy
    monkeypatch.setattr(ActivationFileDataModule, "spliced_cross_entropy",
                        lambda self, *args, **kwargs: scored_contexts.append(args) or splice(self, *args, **kwargs))
    main(["sweep", "--config", str(tmp_path / "sweep.yaml"), "--out", str(tmp_path / "out")])
    members = json.loads((tmp_path / "out/c/results.json").read_text())["members"]
    for member in members.values():
        scored = [("ce_delta" in row) for row in member["history"]]
        assert scored == [False, True, True], scored  # budgets 2, 4 (every 2nd) and the final one
        assert math.isfinite(member["ce_delta"]) and 0 < member["ce_delta"] and member["ce_recovered"] < 1
    assert members["SA"]["ce_delta"] != members["G"]["ce_delta"]
    assert len(scored_contexts) == 4  # 2 members × 2 scored rows

    config["trainer"]["max_steps"] = 8  # the last budget, 8, is due in the fit: the final validate reuses it
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    main(["sweep", "--config", str(tmp_path / "sweep.yaml"), "--out", str(tmp_path / "longer")])
    longer = json.loads((tmp_path / "longer/c/results.json").read_text())["members"]
    for name, member in longer.items():
        assert [("ce_delta" in row) for row in member["history"]] == [False, True, False, True]
        assert member["ce_delta"] == member["history"][-1]["ce_delta"]
    assert len(scored_contexts) == 4 + 4, "the final validate scored the same weights again"
    cached = ActivationFileDataModule(str(cache_dir))
    assert cached.language_model_data().hparams.layer == 2
    identity = cached.spliced_cross_entropy(lambda x: x, contexts=4)
    assert identity["ce_delta"] == pytest.approx(0.0, abs=1e-6) and identity["ce_recovered"] == pytest.approx(1.0)


def test_the_clean_and_zeroed_lm_loss_are_kept_in_the_cache_folder(cache_dir, tmp_path):
    """The first spliced LM loss on a cache writes its clean and zeroed CE beside it; a later run reads them
    instead of running the LM twice more (shown by an edited value coming back), for the same contexts only."""
    import shutil

    from datamodules.activation_files import BASELINES

    folder = tmp_path / "cache"
    shutil.copytree(cache_dir, folder)
    (folder / BASELINES).unlink(missing_ok=True)  # earlier tests' runs on the shared cache wrote theirs
    first = ActivationFileDataModule(str(folder)).spliced_cross_entropy(lambda x: 0.5 * x, contexts=4)
    stored = json.loads((folder / BASELINES).read_text())
    (key, values), = stored.items()
    assert values == {"ce_clean": first["ce_clean"], "ce_zero": first["ce_zero"]}
    stored[key]["ce_zero"] = 99.0
    (folder / BASELINES).write_text(json.dumps(stored))
    again = ActivationFileDataModule(str(folder)).spliced_cross_entropy(lambda x: 0.5 * x, contexts=4)
    assert again["ce_zero"] == 99.0 and again["ce_sae"] == first["ce_sae"] and again["ce_clean"] == first["ce_clean"]
    other = ActivationFileDataModule(str(folder)).spliced_cross_entropy(lambda x: 0.5 * x, contexts=3)
    assert other["ce_zero"] != 99.0 and len(json.loads((folder / BASELINES).read_text())) == 2


def test_selection_and_verdict_halves_split_the_held_out_data(cache_dir):
    """A recipe chosen on the selection half is reported on the verdict half: disjoint held-out tokens and LM
    contexts, which together are all of them."""
    parts = {part: ActivationFileDataModule(str(cache_dir), batch_size=100, val_tokens=10_000, held_out=part)
             for part in ("all", "selection", "verdict")}
    rows = {part: torch.cat(list(data.val_dataloader())) for part, data in parts.items()}
    assert len(rows["selection"]) == 200 and torch.equal(torch.cat([rows["selection"], rows["verdict"]]), rows["all"])
    parts["verdict"].spliced_cross_entropy(lambda x: x, contexts=2)
    parts["selection"].spliced_cross_entropy(lambda x: x, contexts=2)
    chosen = {part: data.language_model_data().evaluators[2, part, 0].input_ids
              for part, data in parts.items() if part != "all"}
    assert not torch.equal(chosen["selection"], chosen["verdict"])
    with pytest.raises(ValueError, match="held_out must be one of all, selection, verdict"):
        ActivationFileDataModule(str(cache_dir), held_out="test")


def test_cache_refuses_an_existing_folder_and_a_missing_gpu_before_loading_the_lm(cache_dir):
    """Both are caught by the command line, with the flag named, before any model loads (the GPU's before
    Lightning loads); the folder is untouched."""
    before = sorted(p.name for p in cache_dir.rglob("*"))
    base = [sys.executable, "-m", "sagsae", "cache", "--config", "configs/default.yaml"]
    result = subprocess.run([*base, "--out", str(cache_dir)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"--out {cache_dir} already exists" in result.stderr
    assert sorted(p.name for p in cache_dir.rglob("*")) == before
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the missing-GPU message cannot be shown here")
    arguments = ["cache", "--config", "configs/default.yaml", "--out", str(cache_dir.parent / "new"),
                 "--device", "cuda"]
    code = (f"import sys; from sagsae.__main__ import main\ntry: main({arguments!r})\n"
            "finally: assert 'lightning' not in sys.modules, 'the refusal waited for Lightning'")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--device cuda: this machine has no CUDA device" in result.stderr, result.stderr
    assert not (cache_dir.parent / "new").exists()
