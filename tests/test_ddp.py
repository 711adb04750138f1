"""DDP correctness on 2 gloo CPU processes: every shipped config trains, data-driven starts see every rank's
batch, a stop seen on one rank stops all, and validation under DDP reports exactly what one process reports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from datamodules import TensorActivationDataModule
from sagsae.commands import end_process_group
from sagsae.commands.train import SAGSAECLI
from lightning_modules import SAEModule
from tests.ddp_scenarios import STEP_DATA, validate
from tests.test_architecture_configs import CONFIGS
from tests.test_cli import REPO

pytestmark = pytest.mark.slow(195)  # seconds in all: the longest files run first (tests/conftest.py)

QUANTILE_STARTS = {  # every architecture whose start is data-driven; lr 0 keeps the start through the step
    "start-sagsae": {"sae": "sagsae", "width": 16, "theta_init_quantile": 0.9, "lr": 0.0, "init_seed": 1},
    "start-gated": {"sae": "gated", "width": 16, "gate_init_quantile": 0.9, "lr": 0.0, "init_seed": 2},
    "start-jumprelu": {"sae": "jumprelu", "width": 16, "theta_init_quantile": 0.9, "lr": 0.0, "init_seed": 3},
}


def run_scenario(spec: dict[str, Any], folder: Path, timeout: float) -> tuple[int, str]:
    """Run a scenario of tests/ddp_scenarios.py on 2 processes: (exit status, stderr). On a timeout the whole
    process group (both ranks) is killed and the test fails, naming the hang."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.json"
    path.write_text(json.dumps({**spec, "out": str(folder)}))
    process = subprocess.Popen([sys.executable, "-m", "tests.ddp_scenarios", str(path)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{spec['scenario']} did not finish within {timeout} s on 2 processes (a rank hung)")
    assert not group_alive(process.pid), f"{spec['scenario']}: a rank outlived the run"
    return process.returncode, stderr


def group_alive(group: int, grace: float = 10.0) -> bool:
    """Whether any process of the scenario's process group is still running after `grace` seconds."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.2)
    os.killpg(group, signal.SIGKILL)
    return True


def launch(spec: dict[str, Any], folder: Path, timeout: float = 240) -> list[dict[str, Any]]:
    """Run a scenario that must succeed; what each rank recorded."""
    returncode, stderr = run_scenario(spec, folder, timeout)
    assert returncode == 0, stderr[-3000:]
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


def config_member(config: Path) -> dict[str, Any]:
    """The model that `fit --config default.yaml --config <config>` builds, as flat sweep-member arguments."""
    overlay = [] if config.name == "default.yaml" else ["--config", str(REPO / "configs" / config)]
    cli = SAGSAECLI(args=["--config", str(REPO / "configs" / "default.yaml"), *overlay, "--model.sae.width", "128"],
                    run=False)
    model = cli.config["model"].as_dict()
    sae = model.pop("sae")
    model.pop("d_in")
    return {"sae": sae["class_path"], **sae["init_args"], **model, "init_seed": 0}


def test_every_shipped_config_trains_under_ddp_and_starts_from_every_ranks_batch(tmp_path):
    configs = {str(config).replace("/", "_").removesuffix(".yaml"): config_member(config) for config in CONFIGS}
    members = {**configs, **QUANTILE_STARTS}
    ranks = launch({"scenario": "train_sweep", "members": members, "steps": 3, "batch_size": 256}, tmp_path)
    assert [rank["global_step"] for rank in ranks] == [3, 3]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key  # the ranks stay in step
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key

    # One process that sees both ranks' first batches (each rank takes every other batch of one permutation).
    data = TensorActivationDataModule(STEP_DATA, batch_size=256)
    stream = data.batches()
    first_batches = torch.cat([next(stream), next(stream)])  # rank 0's first batch, then rank 1's
    for name, arguments in QUANTILE_STARTS.items():
        arguments = dict(arguments)
        reference = SAEModule.from_arguments(arguments.pop("sae"), d_in=STEP_DATA.shape[1], **arguments)
        reference.sae.set_scales(data.estimate_scales())
        reference.sae.initialize_from_batch(reference.sae.normalize(first_batches))
        state = ranks[0]["state"]
        assert torch.equal(state[f"members.{name}.sae.b_dec"], reference.sae.b_dec.detach()), name
        assert torch.equal(state[f"members.{name}.initial_thresholds"], reference.sae.threshold_values()), name


@pytest.mark.parametrize("log_every, stop", [(1, 2), (4, 4)])
def test_a_gate_collapse_seen_on_one_rank_stops_every_rank(log_every, stop, tmp_path):
    """Seen from the end of step 2 on; the monitor judges at logging steps, so both ranks stop at the first
    logging step from there."""
    ranks = launch({"scenario": "collapse_on_one_rank", "steps": 50, "at": 2, "log_every": log_every}, tmp_path,
                   timeout=120)
    assert [rank["global_step"] for rank in ranks] == [stop, stop]


def test_the_process_group_a_run_leaves_is_destroyed_before_exit(tmp_path):
    """`sagsae` and the scenarios end with end_process_group: left to the interpreter's exit, gloo's threads made a
    scenario that succeeded abort (SIGABRT) about once in a few hundred runs."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        end_process_group()
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    end_process_group()  # and without a group it does nothing


@pytest.mark.parametrize("rank", [0, 1])
def test_one_rank_raising_ends_every_rank_with_the_error_named(rank, tmp_path):
    started = time.perf_counter()
    returncode, stderr = run_scenario({"scenario": "one_rank_raises", "steps": 50, "rank": rank, "at": 3},
                                      tmp_path, timeout=120)
    assert returncode != 0
    assert f"staged failure on rank {rank} at step 3" in stderr
    assert not [line for line in stderr.splitlines() if "Timeout" in line or "timed out" in line], stderr[-2000:]
    print(f"rank {rank} raised; both ranks ended after {time.perf_counter() - started:.1f} s")


@pytest.mark.parametrize("source", ["live", "cache"])
def test_ddp_validation_sees_every_held_out_token_once_and_reports_what_one_process_does(
        source, tiny_llama, text_file, cache_dir, tmp_path):
    if source == "live":
        datamodule = {"class_path": "datamodules.LMActivationDataModule",
                      "init_args": {"model": str(tiny_llama), "dataset": "json", "data_files": str(text_file),
                                    "layer": 2, "context_length": 32, "lm_batch_size": 16, "batch_size": 64,
                                    "val_fraction": 0.1, "val_tokens": 512, "normalization_tokens": 256}}
        tokens = 512
    else:
        datamodule = {"class_path": "datamodules.ActivationFileDataModule",
                      "init_args": {"path": str(cache_dir), "batch_size": 64}}
        tokens = 400
    spec = {"scenario": "validate", "datamodule": datamodule, "d_in": 32, "contexts": 4}
    single = validate(spec, devices=1)
    ranks = launch(spec, tmp_path)

    def rows(batches: list[torch.Tensor]) -> Counter:
        return Counter(row.numpy().tobytes() for batch in batches for row in batch)

    assert sum(len(batch) for batch in single["batches"]) == tokens
    assert rows(ranks[0]["batches"]) + rows(ranks[1]["batches"]) == rows(single["batches"])
    assert {"val/r2", "val/l0", "val/ce_delta"} <= set(single["metrics"])
    for rank in ranks:
        assert set(rank["metrics"]) == set(single["metrics"])
        for key, value in single["metrics"].items():
            assert rank["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key  # fp32 sums in another order


def test_a_live_stream_under_ddp_resumes_every_rank_where_it_stood(tiny_llama, text_file, tmp_path):
    """A resume to step 8 from the checkpoint that `fit`'s LastCheckpoint wrote at step 4 of an 8-step run trains
    on the same batches as the run did, on both ranks: the checkpoint holds each rank's own stream state
    (ShuffledStream), not rank 0's, and a save mid-run counts no batch that the ranks fetched ahead."""
    datamodule = {"model": str(tiny_llama), "dataset": "json", "data_files": str(text_file), "layer": 1,
                  "context_length": 16, "lm_batch_size": 4, "batch_size": 32, "shuffle_buffer_tokens": 160,
                  "val_tokens": 64, "normalization_tokens": 128}
    spec = {"scenario": "live_fit", "datamodule": datamodule, "steps": 8}
    straight = launch({**spec, "every": 4}, tmp_path / "straight")
    half = tmp_path / "straight" / "checkpoints" / "step=4.ckpt"
    saved = torch.load(half, weights_only=False)
    assert saved["global_step"] == 4
    ranks = saved["LMActivationDataModule"]["ranks"]
    assert len(ranks) == 2 and ranks[0]["position"] != ranks[1]["position"]
    resumed = launch({**spec, "ckpt": str(half)}, tmp_path / "resumed")
    for rank in (0, 1):
        assert resumed[rank]["global_step"] == straight[rank]["global_step"] == 8
        for name, value in straight[rank]["state"].items():
            torch.testing.assert_close(resumed[rank]["state"][name], value, rtol=0, atol=0, msg=name)


def test_two_nodes_started_by_torchrun_train_and_validate_as_one_node_and_one_process(tmp_path):
    """Lightning's cluster-environment path (torchrun's variables; 2 nodes × 1 process on localhost, gloo) trains
    on the same batches, to the same weights, and validates to the same metrics as 2 processes on one node; and
    together its ranks see one process's batches and report its held-out metrics."""
    from callbacks import SAEMetrics
    from tests.ddp_scenarios import ddp_trainer

    spec = {"scenario": "fit_and_validate", "steps": 4}
    one_node = launch(spec, tmp_path / "one_node")
    (tmp_path / "two_nodes").mkdir()
    (tmp_path / "two_nodes" / "spec.json").write_text(json.dumps({**spec, "nodes": 2, "out": str(tmp_path / "two_nodes")}))
    with socket.socket() as probe:  # a port that is free now, on loopback
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", port,
                               "-m", "tests.ddp_scenarios", str(tmp_path / "two_nodes" / "spec.json")],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:  # a node that hangs (its peer died) must not outlive the test, nor its workers
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]
    two_nodes = [torch.load(tmp_path / "two_nodes" / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]

    for node_rank, process_rank in zip(two_nodes, one_node):
        assert node_rank["global_step"] == process_rank["global_step"] == 4
        for kind in ("training", "held_out"):
            assert len(node_rank[kind]) == len(process_rank[kind]) > 0
            assert all(torch.equal(a, b) for a, b in zip(node_rank[kind], process_rank[kind])), kind
        for key, value in process_rank["state"].items():
            assert torch.equal(node_rank["state"][key], value), key
        assert node_rank["metrics"] == process_rank["metrics"] and "val/r2" in node_rank["metrics"]

    stream = TensorActivationDataModule(STEP_DATA[:3072], batch_size=128).batches()
    one_process = [next(stream) for _ in range(8)]  # the ranks take alternate batches of one process's stream
    assert all(torch.equal(two_nodes[step % 2]["training"][step // 2], batch) for step, batch in enumerate(one_process))
    trained = SAEModule.from_arguments("sagsae", d_in=8, width=16, lr=0.01, init_seed=0, sparsity_warmup_steps=2)
    trained.load_state_dict(two_nodes[0]["state"])
    trainer = ddp_trainer(0, [SAEMetrics()], devices=1)
    trainer.validate(trained, TensorActivationDataModule(STEP_DATA[:3072], STEP_DATA[3072:], batch_size=128),
                     verbose=False)
    for key, value in two_nodes[0]["metrics"].items():  # fp32 sums in another order
        assert float(trainer.callback_metrics[key]) == pytest.approx(value, rel=1e-5, abs=1e-6), key
