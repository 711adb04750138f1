"""Sweeps: N SAEs from one activation stream train exactly as N separate runs; the `sweep`, `synth` and
`report` commands run end to end, resume, and reject bad configs with a clear message."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from datamodules import TensorActivationDataModule
from lightning_modules import SAEModule, SweepModule
from sagsae.training import TrainingPlan
from sagsae.__main__ import main
from sagsae.analysis.sweep_results import PAPER, paper_claim
from sagsae.commands.sweep import build_sweep, expand_members, select

DATA = torch.randn(4096, 8, generator=torch.Generator().manual_seed(0))


def quiet_trainer(steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, **kwargs)


def three_members() -> dict[str, TrainingPlan]:
    return {"sa": TrainingPlan.from_arguments("sagsae", width=16, init_seed=1, sparsity_coefficient=2,
                                              lr_decay_fraction=0.5),
            "gated": TrainingPlan.from_arguments("gated", width=32, init_seed=2, lr=3e-3),
            "topk": TrainingPlan.from_arguments("topk", width=32, k=4, init_seed=3)}


@pytest.mark.parametrize("clip", [None, 0.05])
def test_three_saes_sharing_one_stream_match_three_separate_runs(clip):
    """Members back-propagate one by one, and with gradient clipping too: a sweep clips each member's gradient
    norm on its own, as `fit` clips it alone (a clip of 0.05 is active at every step here, so the runs would
    differ if the sweep clipped jointly)."""
    sweep = SweepModule(three_members(), gradient_clip_val=clip)
    quiet_trainer(20, limit_val_batches=0).fit(sweep, TensorActivationDataModule(DATA, batch_size=256))
    unclipped = SweepModule(three_members())
    quiet_trainer(20, limit_val_batches=0).fit(unclipped, TensorActivationDataModule(DATA, batch_size=256))
    for name, plan in three_members().items():
        alone = SAEModule.from_plan(plan)
        quiet_trainer(20, limit_val_batches=0, gradient_clip_val=clip).fit(alone, TensorActivationDataModule(DATA, batch_size=256))
        together = sweep.members[name].state_dict()
        assert int(together["steps_trained"]) == 20
        for key, value in alone.state.state_dict().items():
            assert torch.equal(value, together[key]), (name, key)
        if clip is not None:
            assert not torch.equal(unclipped.members[name].sae.W_dec, together["sae.W_dec"]), name


def test_sweep_validation_reports_every_member():
    sweep = SweepModule(three_members())
    quiet_trainer(10, val_check_interval=10).fit(sweep, TensorActivationDataModule(DATA, DATA[:512], batch_size=256))
    assert set(sweep.latest_validation) == {"sa", "gated", "topk"}
    assert sweep.latest_validation["topk"]["l0"] == pytest.approx(4.0)
    assert "bipolar_fraction" in sweep.latest_validation["sa"] and "bipolar_fraction" not in sweep.latest_validation["gated"]
    assert all(row["tokens_seen"] == 10 * 256 for row in sweep.latest_validation.values())


def test_grid_expansion_names_and_errors():
    members = expand_members([{"name": "SA-GSAE(H)", "sae": "sagsae",
                               "init_args": {"width": 8}, "grid": {"sparsity_coefficient": [0.5, 2], "init_seed": [0, 1]}}])
    assert sorted(members) == ["SA-GSAE-H-l0p5-s0", "SA-GSAE-H-l0p5-s1", "SA-GSAE-H-l2-s0", "SA-GSAE-H-l2-s1"]
    assert members["SA-GSAE-H-l2-s1"]["init_args"] == {"width": 8, "sparsity_coefficient": 2, "init_seed": 1}
    with pytest.raises(ValueError, match="Cannot import"):
        expand_members([{"name": "x", "sae": "sagsae.saes.NoSuchSAE"}])
    with pytest.raises(ValueError, match="Unknown SAE architecture 'nosuch'"):
        build_sweep(expand_members([{"name": "x", "sae": "nosuch", "init_args": {"width": 8}}]))
    with pytest.raises(ValueError, match=r"no argument\(s\) \['kk'\]"):
        build_sweep(expand_members([{"name": "x", "sae": "topk", "init_args": {"width": 8}, "grid": {"kk": [1]}}]))
    with pytest.raises(ValueError, match="both named"):
        expand_members([{"name": "x", "sae": "sagsae"}] * 2)


def test_series_and_seed_selection_split_a_sweep():
    """--series keeps the named members only; --seeds replaces every member's seed grid (a new seed's run); --only
    keeps one grid point of each member."""
    config = {"members": [
        {"name": "SA-GSAE(H)", "sae": "sagsae", "grid": {"sparsity_coefficient": [1, 2], "init_seed": [0, 1]}},
        {"name": "Gated(2H)", "sae": "gated", "grid": {"sparsity_coefficient": [4]}}]}
    assert sorted(expand_members(select(config, ["Gated(2H)"], None)["members"])) == ["Gated-2H-l4"]
    assert sorted(expand_members(select(config, None, [2])["members"])) == [
        "Gated-2H-l4-s2", "SA-GSAE-H-l1-s2", "SA-GSAE-H-l2-s2"]
    assert select(config, None, None) == config
    with pytest.raises(ValueError, match=r"Unknown series \['TopK'\]"):
        select(config, ["TopK"], None)
    assert sorted(expand_members(select(config, ["SA-GSAE(H)"], None, ["sparsity_coefficient=2"])["members"])) == [
        "SA-GSAE-H-l2-s0", "SA-GSAE-H-l2-s1"]
    with pytest.raises(ValueError, match="series 'Gated\\(2H\\)' has no grid point sparsity_coefficient=2"):
        select(config, None, None, ["sparsity_coefficient=2"])
    with pytest.raises(ValueError, match="--only takes KEY=VALUE"):
        select(config, None, None, ["sparsity_coefficient"])


SYNTH = {
    "seed": 0,
    "trainer": {"max_steps": 6, "val_check_interval": 3},
    "synthetic": {"n_train": 8192, "n_val": 1024, "batch_size": 512, "d": 16, "axes": 8, "p": 0.1,
                  "protocols": {"A": {"protocol": "a"}, "B": {"protocol": "b", "rho": -1.0}}},
    "compare": [["SA-GSAE(K)", "Gated(2K)"]],
    "members": [
        {"name": "SA-GSAE(K)", "sae": "sagsae", "init_args": {"width": 8},
         "grid": {"sparsity_coefficient": [1, 4], "init_seed": [0, 1]}},
        {"name": "Gated(2K)", "sae": "gated", "init_args": {"width": 16},
         "grid": {"sparsity_coefficient": [1, 4], "init_seed": [0]}},
    ],
}


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    (folder / "synth.yaml").write_text(yaml.safe_dump(SYNTH))
    main(["synth", "--config", str(folder / "synth.yaml"), "--out", str(folder / "out")])
    return folder


def test_synth_writes_data_trains_and_scores_against_the_truth(synth_run):
    metadata = json.loads((synth_run / "out/data/B/metadata.json").read_text())
    assert metadata["protocol"] == "b" and metadata["pair_correlation"] < 0
    results = json.loads((synth_run / "out/A/results.json").read_text())
    assert results["steps"] == 6 and len(results["members"]) == 6
    for member in results["members"].values():
        assert 0 <= member["recovery"] <= 1 and member["true_l0"] == pytest.approx(0.8, abs=0.1)
        assert member["tokens_seen"] == 6 * 512
        assert [row["tokens_seen"] for row in member["history"]] == [3 * 512, 6 * 512]  # every budget checkpoint
        assert member["history"][-1]["r2"] == member["r2"]
        if member["series"] == "SA-GSAE(K)":
            assert member["threshold_rel_change"] >= 0  # θ₀ from θ_init > 0
    assert {m["series"] for m in results["members"].values()} == {"SA-GSAE(K)", "Gated(2K)"}


def test_report_shows_the_synthetic_scores_that_a_cell_holds(synth_run, tmp_path):
    """A hierarchy cell's absorption gets its column, beside recovery; a cell without it gets none."""
    import shutil

    shutil.copytree(synth_run / "out" / "A", tmp_path / "out" / "A")
    results = json.loads((tmp_path / "out/A/results.json").read_text())
    for member in results["members"].values():
        member["absorption"] = 0.25
    (tmp_path / "out/A/results.json").write_text(json.dumps(results))
    main(["report", str(tmp_path / "out"), "--out", str(tmp_path / "report")])
    header = next(line for line in (tmp_path / "report/report.md").read_text().splitlines()
                  if line.startswith("| series | point"))
    assert header.endswith("| recovery | bipolar_sharing | absorption | true_l0 |"), header
    main(["report", str(synth_run / "out"), "--out", str(tmp_path / "plain")])
    assert "absorption" not in (tmp_path / "plain/report.md").read_text()


def test_report_writes_tables_plots_and_verdicts(synth_run):
    main(["report", str(synth_run / "out"), "--out", str(synth_run / "report")])
    report = (synth_run / "report/report.md").read_text()
    assert "## A" in report and "## B" in report and "| SA-GSAE(K) | sparsity_coefficient 1 | 2 |" in report
    assert (synth_run / "report/A.png").stat().st_size > 10_000
    assert (synth_run / "report/A_budget.png").stat().st_size > 10_000 and "![A against the budget]" in report
    rows = [line for line in report.splitlines()  # the convergence tables' rows (the settling tables have 9 columns)
            if line.startswith("| SA-GSAE-K-s0-l1 |") and line.count(" | ") == 10]
    settling = [line for line in report.splitlines() if line.startswith("| SA-GSAE-K-s0-l1 |") and line.count(" | ") == 8]
    assert len(settling) == 2 and all(row.endswith("| **no** |") for row in settling)  # 3k tokens: nothing settles
    assert len(rows) == 2 and all(row.split(" | ")[1] == f"{6 * 512:,}" for row in rows)
    # two checkpoints give no jitter to set a band, hence no gain at matched L0 either
    assert all(row.split(" | ")[-3:-1] == ["too short", "–"] for row in rows)
    summaries = [line for line in report.splitlines() if line.startswith("| SA-GSAE(K) | 4 | ")]  # per series
    assert len(summaries) == 2 and all(line.endswith(" | 0 | – | 0 | 0 | – |") for line in summaries)
    verdicts = json.loads((synth_run / "report/verdicts.json").read_text())
    assert [(v["cell"], v["a"], v["b"]) for v in verdicts] == [("A", "SA-GSAE(K)", "Gated(2K)"),
                                                               ("B", "SA-GSAE(K)", "Gated(2K)")]
    for v in verdicts:  # after 6 steps each series' L0 barely moves with λ: the two L0 ranges lie apart
        l0s = {name: [m["l0"] for m in json.loads((synth_run / "out" / v["cell"] / "results.json").read_text())
                      ["members"].values() if m["series"] == name] for name in (v["a"], v["b"])}
        assert max(l0s[v["a"]]) < min(l0s[v["b"]]) or max(l0s[v["b"]]) < min(l0s[v["a"]])
        assert v["verdict"] == "no overlap" and v["overlap"] is None


def test_sweep_resumes_an_unfinished_cell_and_extends_a_finished_one_exactly(synth_run, tmp_path, capsys):
    config = {**SYNTH, "cells": {"A": {"class_path": "datamodules.ActivationFileDataModule",
                                       "init_args": {"path": str(synth_run / "out/data/A"), "batch_size": 512}}}}
    del config["synthetic"]
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))

    def sweep(out: str, steps: int) -> None:
        main(["sweep", "--config", str(tmp_path / "sweep.yaml"), "--out", str(tmp_path / out), "--max_steps", str(steps)])

    sweep("once", 6)
    sweep("twice", 3)
    shutil.copytree(tmp_path / "twice", tmp_path / "extended")
    (tmp_path / "twice/A/results.json").unlink()  # as if stopped after step 3
    saved = torch.load(tmp_path / "twice/A/checkpoints/last.ckpt", weights_only=False)
    assert saved["global_step"] == 3 and len(next(iter(saved["validation_history"].values()))) == 1
    sweep("twice", 6)
    assert "resuming from" in capsys.readouterr().out
    sweep("extended", 6)  # finished at 3 steps: trains on to 6
    assert "extending from 3 steps" in capsys.readouterr().out
    shorter = json.loads((tmp_path / "extended/A/results.step3.json").read_text())
    assert shorter["steps"] == 3, "the shorter run's results stay beside the longer one's"
    once = json.loads((tmp_path / "once/A/results.json").read_text())["members"]
    for out in ("twice", "extended"):
        again = json.loads((tmp_path / out / "A/results.json").read_text())["members"]
        for name in once:
            assert again[name]["r2"] == pytest.approx(once[name]["r2"], abs=1e-6), (out, name)
            assert again[name]["tokens_seen"] == once[name]["tokens_seen"]
            assert again[name]["history"] == once[name]["history"], "the budget history survives the resume"
    sweep("extended", 6)
    assert "done already" in capsys.readouterr().out
    decaying = {**config, "members": [{**config["members"][0], "init_args": {"width": 8, "lr_decay_fraction": 0.5}}]}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(decaying))
    with pytest.raises(SystemExit, match="decay the LR"):
        sweep("extended", 9)
    assert (tmp_path / "extended/A/results.json").is_file(), "a refused extension moves nothing"
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "extended/A/checkpoints/last.ckpt").unlink()
    with pytest.raises(SystemExit, match="is gone"):
        sweep("extended", 9)
    assert (tmp_path / "extended/A/results.json").is_file(), "a refused extension moves nothing"


def test_a_sweep_refuses_to_resume_from_a_checkpoint_whose_pickle_runs_code(synth_run, tmp_path):
    """A sweep resumes through a weights_only read: a crafted last.ckpt is refused in one line that names it,
    its code never runs, and nothing trains."""
    from tests.test_export import RunsCode

    config = {**SYNTH, "cells": {"A": {"class_path": "datamodules.ActivationFileDataModule",
                                       "init_args": {"path": str(synth_run / "out/data/A"), "batch_size": 512}}}}
    del config["synthetic"]
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    marker, checkpoint = tmp_path / "code-ran", tmp_path / "out/A/checkpoints/last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "sweep_members": {}, "loops": RunsCode(marker)}, checkpoint)
    with pytest.raises(SystemExit, match="Refusing to open") as refused:
        main(["sweep", "--config", str(tmp_path / "sweep.yaml"), "--out", str(tmp_path / "out")])
    message = str(refused.value.code)
    assert "\n" not in message and str(checkpoint) in message and "posix.system" in message, message
    assert not marker.exists() and not (tmp_path / "out/A/results.json").exists()


def test_sweep_rejects_unknown_cells_and_missing_sections(tmp_path):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"cells": {}, "members": []}))
    with pytest.raises(SystemExit, match="non-empty 'cells'"):
        main(["sweep", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "out")])
    config = {"cells": {"A": {"class_path": "datamodules.ActivationFileDataModule", "init_args": {"path": "x"}}},
              "members": SYNTH["members"]}
    (tmp_path / "cells.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match=r"Unknown cell\(s\) \['Z'\]"):
        main(["sweep", "--config", str(tmp_path / "cells.yaml"), "--out", str(tmp_path / "out"), "--cells", "Z"])
    (tmp_path / "logger.yaml").write_text(yaml.safe_dump({**config, "trainer": {"logger": False}}))
    with pytest.raises(SystemExit, match="sets trainer.logger itself"):
        main(["sweep", "--config", str(tmp_path / "logger.yaml"), "--out", str(tmp_path / "out")])


def test_report_gives_the_paper_claim_only_for_sagsae_against_gated():
    members = {f"{series}-s0": {"series": series, "architecture": name}
               for series, name in [("SA", "sagsae"), ("G", "gated"), ("G2", "gated"), ("T", "topk")]}
    cell = {"activations": {"hookpoint": "mlp_out"}, "members": members}
    assert paper_claim(cell, "SA", "G") == PAPER["mlp_out"]
    assert paper_claim(cell, "G", "G2") == paper_claim(cell, "SA", "T") == paper_claim(cell, "G", "SA") == "–"
    assert paper_claim({**cell, "activations": None}, "SA", "G") == "–"  # synthetic cells: no hookpoint


def test_report_merges_same_named_cells_of_several_sweeps(tmp_path):
    """Series trained in separate sweeps on the same cell are compared as one cell."""
    from sagsae.analysis.sweep_results import load_cells
    from sagsae.commands.report import write_report

    def member(series, l0, r2, seed):
        return {"series": series, "point": {"sparsity_coefficient": l0, "init_seed": seed}, "width": 8,
                "l0": l0, "r2": r2, "dead_fraction": 0.0, "silent_fraction": 0.0, "tokens_seen": 100}

    for sweep, series, offset in (("first", "X", 0.0), ("second", "Y", 0.1)):
        members = {f"{series}-{l0}-{seed}": member(series, l0, 0.5 + 0.01 * l0 + offset, seed)
                   for l0 in (2, 4, 8) for seed in (0, 1)}
        (tmp_path / sweep / "A").mkdir(parents=True)
        (tmp_path / sweep / "A" / "results.json").write_text(json.dumps({"cell": "A", "steps": 5, "members": members}))
    cells = load_cells([tmp_path / "first", tmp_path / "second"])
    assert list(cells) == ["A"] and len(cells["A"]["members"]) == 12 and cells["A"]["steps"] == [5]
    write_report([tmp_path / "first", tmp_path / "second"], tmp_path / "report", [("Y", "X")])
    verdict = json.loads((tmp_path / "report" / "verdicts.json").read_text())[0]
    assert verdict["verdict"] == "dominates" and verdict["min_gap"] == pytest.approx(0.1)
    with pytest.raises(SystemExit, match="X-2-0 of cell A is in both .*first and .*first"):
        main(["report", str(tmp_path / "first"), str(tmp_path / "first"), "--out", str(tmp_path / "twice")])


def test_tagged_groups_keep_the_same_series_at_two_widths_apart(tmp_path, capsys):
    """`report --tag 1× A --tag 4× B`: one cell, the series named by group, the config's pairs tagged with them."""
    from sagsae.analysis.sweep_results import load_cells

    for sweep, width, offset in (("narrow", 8, 0.0), ("wide", 32, 0.1)):
        members = {f"{series}-{l0}": {"series": series, "point": {"target_l0": l0}, "width": width, "l0": l0,
                                      "r2": 0.5 + 0.01 * l0 + offset + (0.05 if series == "Y" else 0),
                                      "dead_fraction": 0.0, "silent_fraction": 0.0, "tokens_seen": 100}
                   for series in ("X", "Y") for l0 in (2, 4, 8)}
        (tmp_path / sweep / "A").mkdir(parents=True)
        (tmp_path / sweep / "A" / "results.json").write_text(json.dumps({"cell": "A", "steps": 5, "members": members}))
        (tmp_path / sweep / "sweep.yaml").write_text(yaml.safe_dump({"compare": [["Y", "X"]]}))
    tags = {tmp_path / "narrow": "1×", tmp_path / "wide": "4×"}
    cells = load_cells(list(tags), tags)
    assert {member["series"] for member in cells["A"]["members"].values()} == {"X 1×", "Y 1×", "X 4×", "Y 4×"}
    main(["report", "--tag", "1×", str(tmp_path / "narrow"), "--tag", "4×", str(tmp_path / "wide"),
          "--out", str(tmp_path / "report")])
    verdicts = json.loads((tmp_path / "report" / "verdicts.json").read_text())
    assert {(v["a"], v["b"], v["verdict"]) for v in verdicts if v["metric"] == "R²"} == {
        ("Y 1×", "X 1×", "dominates"), ("Y 4×", "X 4×", "dominates")}
    with pytest.raises(SystemExit):
        main(["report", "--tag", "1×", "--out", str(tmp_path / "none")])
    assert "--tag 1× names no sweep folder" in capsys.readouterr().err


def test_a_ce_verdict_says_when_every_member_lowers_the_lms_loss():
    """On a cell where every seed of both series has ΔCE < 0 the ΔCE verdict is marked `below_zero` (a lower ΔCE
    is then no better fit); one seed above zero clears the mark. R² verdicts never carry it."""
    from sagsae.analysis.sweep_results import cell_verdicts

    def cell(highest_ce: float) -> dict:
        members = {f"{series}-{l0}-{seed}": {"series": series, "point": {"target_l0": l0, "init_seed": seed},
                                              "width": 8, "l0": l0, "r2": 0.5 + 0.01 * l0 + shift,
                                              "dead_fraction": 0.0, "tokens_seen": 100,
                                              "ce_delta": highest_ce if (series, l0, seed) == ("X", 8, 1) else
                                              -0.004 + 0.0001 * l0 - shift / 100}
                   for series, shift in (("X", 0.0), ("Y", 0.1)) for l0 in (2, 4, 8) for seed in (0, 1)}
        return {"members": members}

    below = {v["metric"]: v["below_zero"] for v in cell_verdicts("A", cell(-0.001), [("Y", "X")])}
    assert below == {"R²": False, "ΔCE": True}
    assert [v["below_zero"] for v in cell_verdicts("A", cell(+0.001), [("Y", "X")])] == [False, False]


def test_data_seed_changes_the_batches_and_nothing_else(synth_run, tmp_path):
    """--data_seed reorders every cell's data: same init seeds, different batches, different weights."""
    config = {**SYNTH, "cells": {"A": {"class_path": "datamodules.ActivationFileDataModule",
                                       "init_args": {"path": str(synth_run / "out/data/A"), "batch_size": 512}}}}
    del config["synthetic"]
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    runs = {}
    for seed in (0, 0, 1):
        out = tmp_path / f"data{seed}-{len(runs)}"
        main(["sweep", "--config", str(tmp_path / "sweep.yaml"), "--out", str(out), "--max_steps", "3",
              "--series", "SA-GSAE(K)", "--seeds", "0", "--data_seed", str(seed)])
        runs[out.name] = json.loads((out / "A/results.json").read_text())["members"]["SA-GSAE-K-s0-l1"]["r2"]
        assert yaml.safe_load((out / "sweep.yaml").read_text())["data_seed"] == seed
    first, again, other = runs.values()
    assert first == again and other != first


def test_a_grid_point_run_alone_trains_as_in_the_joint_run(synth_run, tmp_path):
    """--only splits a sweep into one job per grid point: the member's weights, so its scores, are the joint run's."""
    config = {**SYNTH, "cells": {"A": {"class_path": "datamodules.ActivationFileDataModule",
                                       "init_args": {"path": str(synth_run / "out/data/A"), "batch_size": 512}}}}
    del config["synthetic"]
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    scores = []
    for only in ([], ["--only", "sparsity_coefficient=4"]):
        out = tmp_path / f"run{len(scores)}"
        main(["sweep", "--config", str(tmp_path / "sweep.yaml"), "--out", str(out), "--max_steps", "3",
              "--series", "SA-GSAE(K)", "--seeds", "0", *only])
        members = json.loads((out / "A/results.json").read_text())["members"]
        scores.append((len(members), members["SA-GSAE-K-s0-l4"]["r2"], members["SA-GSAE-K-s0-l4"]["l0"]))
    (joint, *joint_scores), (alone, *alone_scores) = scores
    assert (joint, alone) == (2, 1) and joint_scores == alone_scores


def test_report_reads_every_member_at_an_earlier_budget(tmp_path):
    """`--at_tokens` reads each member at its last budget checkpoint within the budget: here Y leads X at 200
    tokens and breaks down by 400, so the verdict flips between the two budgets, and a budget below every
    checkpoint is refused with a message that names the flag."""
    def member(series, l0, seed, r2_by_budget):
        history = [{"l0": l0, "r2": r2, "dead_fraction": 0.0, "silent_fraction": 0.0, "tokens_seen": tokens}
                   for tokens, r2 in r2_by_budget]
        return {"series": series, "point": {"sparsity_coefficient": l0, "init_seed": seed}, "width": 8,
                "history": history, **history[-1]}

    members = {f"{series}-{l0}-{seed}": member(series, l0, seed, [(200, 0.5 + 0.01 * l0 + lead), (400, 0.5 + 0.01 * l0 + late)])
               for series, lead, late in (("X", 0.0, 0.0), ("Y", 0.1, -0.3)) for l0 in (2, 4, 8) for seed in (0, 1)}
    (tmp_path / "sweep" / "A").mkdir(parents=True)
    (tmp_path / "sweep" / "A" / "results.json").write_text(json.dumps({"cell": "A", "steps": 4, "members": members}))
    verdicts = {}
    for budget in (300, 400):
        main(["report", str(tmp_path / "sweep"), "--out", str(tmp_path / f"at{budget}"), "--compare", "Y", "X",
              "--at_tokens", str(budget)])
        verdicts[budget] = json.loads((tmp_path / f"at{budget}" / "verdicts.json").read_text())[0]
    assert verdicts[300]["verdict"] == "dominates" and verdicts[300]["min_gap"] == pytest.approx(0.1)
    assert verdicts[400]["verdict"] == "dominated" and verdicts[400]["max_gap"] == pytest.approx(-0.3)
    assert "after 300 training tokens" in (tmp_path / "at300" / "report.md").read_text()
    with pytest.raises(SystemExit, match="no budget checkpoint at or below 100 tokens .*--at_tokens"):
        main(["report", str(tmp_path / "sweep"), "--out", str(tmp_path / "at100"), "--at_tokens", "100"])
    main(["report", str(tmp_path / "sweep"), "--out", str(tmp_path / "only_x"), "--series", "X"])
    only_x = (tmp_path / "only_x" / "report.md").read_text()
    assert "| X | sparsity_coefficient 2 |" in only_x and "| Y |" not in only_x
    with pytest.raises(SystemExit, match=r"Unknown series \['Z'\] \(--series\)"):
        main(["report", str(tmp_path / "sweep"), "--out", str(tmp_path / "only_z"), "--series", "Z"])


def test_report_reads_each_member_against_the_settle_criteria(tmp_path):
    """Two seeds of a quiet fixed-λ member settle; a member whose L0 climbs while R² falls does not; a target-L0
    member that ends on its target settles, one that ends 20% off does not."""
    def member(series, point, rows):
        history = [{"l0": l0, "r2": r2, "dead_fraction": 0.0, "silent_fraction": 0.0, "tokens_seen": 512_000 * (i + 1),
                    "loss_spikes": 0} for i, (r2, l0) in enumerate(rows)]
        return {"series": series, "point": point, "width": 8, "history": history, **history[-1]}

    learning = [(0.50, 60), (0.60, 45), (0.65, 40)]
    quiet = [(0.70 + 0.0005 * (i % 2), 40.0 * (1 + 0.005 * (i % 3))) for i in range(12)]
    drifting = [(0.70 - 0.003 * i, 40.0 * (1 + 0.05 * i)) for i in range(12)]
    members = {"quiet-s0": member("quiet", {"sparsity_coefficient": 4, "init_seed": 0}, learning + quiet),
               "quiet-s1": member("quiet", {"sparsity_coefficient": 4, "init_seed": 1}, learning + quiet[::-1]),
               "drift-s0": member("drift", {"sparsity_coefficient": 4, "init_seed": 0}, learning + drifting),
               "on-target": member("target", {"target_l0": 40}, learning + quiet),
               "off-target": member("target", {"target_l0": 50}, learning + quiet)}
    (tmp_path / "sweep" / "A").mkdir(parents=True)
    (tmp_path / "sweep" / "A" / "results.json").write_text(json.dumps({"cell": "A", "steps": 4, "members": members}))
    main(["report", str(tmp_path / "sweep"), "--out", str(tmp_path / "report")])
    rows = {line.split(" | ")[0].strip("| "): line for line in (tmp_path / "report" / "report.md").read_text().splitlines()
            if line.startswith("| ") and line.rstrip().endswith(("| yes |", "| **no** |"))}
    assert rows["quiet-s0"].endswith("| yes |") and rows["quiet-s1"].endswith("| yes |") and "| 2 |" in rows["quiet-s0"]
    assert rows["drift-s0"].endswith("| **no** |")
    assert rows["on-target"].endswith("| yes |") and rows["off-target"].endswith("| **no** |")


def test_collect_copies_progress_then_results_into_the_docs(tmp_path):
    """configs/sweeps/collect.sh: an unfinished cell's progress.json as a snapshot; once finished, its results with
    the job's sweep.yaml and environment.json, and the snapshot gone."""
    script = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "collect.sh"
    job, dest = tmp_path / "runs" / "study_gated_t20", tmp_path / "docs"
    (job / "mlp_out").mkdir(parents=True)
    (job / "sweep.yaml").write_text("seed: 0\n")
    (job / "environment.json").write_text("{}")
    (job / "mlp_out" / "progress.json").write_text('{"steps": 250}')
    subprocess.run(["bash", str(script), str(dest), str(job)], check=True, capture_output=True)
    snapshot = dest / "in_progress" / "mlp_out_study_gated_t20.json"
    assert json.loads(snapshot.read_text()) == {"steps": 250}
    (job / "mlp_out" / "results.json").write_text('{"steps": 4000}')
    subprocess.run(["bash", str(script), str(dest), str(job)], check=True, capture_output=True)
    finished = dest / "sweeps" / "study_gated_t20"
    assert json.loads((finished / "mlp_out" / "results.json").read_text()) == {"steps": 4000}
    assert (finished / "sweep.yaml").is_file() and (finished / "environment.json").is_file()
    assert not snapshot.exists()


def test_the_queue_skips_jobs_whose_results_are_committed(tmp_path):
    """configs/sweeps/queue.sh on a new machine: a job whose results collect.sh committed is not trained again."""
    scripts = tmp_path / "configs" / "sweeps"
    scripts.mkdir(parents=True)
    shutil.copy(Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "queue.sh", scripts)
    committed = tmp_path / "docs" / "results" / "study" / "sweeps" / "study_a" / "mlp_out"
    committed.mkdir(parents=True)
    (committed / "results.json").write_text("{}")
    jobs = tmp_path / "study.jobs"
    jobs.write_text("# name|config|cell|series|out|more\n"
                    "a|c.yaml|mlp_out|X|runs/sweeps/study_a|--only k=1\n"
                    "b|c.yaml|mlp_out|X|runs/sweeps/study_b|--only k=2\n")
    done = subprocess.run(["bash", str(scripts / "queue.sh"), str(jobs)], env={"PATH": "/usr/bin:/bin",
                          "PYTHON": "echo"}, capture_output=True, text=True, check=True)
    assert "start b" in done.stdout and "start a" not in done.stdout
    assert "--out runs/sweeps/study_b --only k=2" in done.stdout
