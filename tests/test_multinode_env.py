"""`tessera fit` under SLURM's environment variables, without a cluster: the processes are started
here with the variables srun would give them, and Lightning's SLURMEnvironment takes it from there."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).parents[1]


def slurm_env(procid: int, nodeid: int, ntasks: int, nnodes: int, ntasks_per_node: int, port: int) -> dict[str, str]:
    """This environment, less any SLURM variables of its own, plus those srun sets for one task."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("SLURM_")}
    env.update(
        SLURM_JOB_ID="4242", SLURM_JOB_NAME="tessera-test",  # not "bash": Lightning ignores interactive jobs
        SLURM_NTASKS=str(ntasks), SLURM_NNODES=str(nnodes), SLURM_NTASKS_PER_NODE=str(ntasks_per_node),
        SLURM_PROCID=str(procid), SLURM_LOCALID=str(procid % ntasks_per_node), SLURM_NODEID=str(nodeid),
        SLURM_NODELIST="127.0.0.1", SLURM_STEP_ID="0", MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    return env


def fit_command(tmp_path: Path, shards: list[str], num_nodes: int, devices: int) -> list[str]:
    return [
        sys.executable, "-m", "tessera.commands.cli", "fit",
        "--config", str(REPO / "configs/tokenizer/tiny_shapes.yaml"),
        "--model.init_args.autoencoder.image_size=32", "--model.init_args.loss.disc_start=2",
        "--data=datamodules.caption_image.CaptionImageDataModule",
        f"--data.train_shards={shards[0]}", f"--data.val_shards={shards[2]}",
        "--data.image_size=32", "--data.batch_size=4", "--data.num_workers=0",
        f"--trainer.num_nodes={num_nodes}", f"--trainer.devices={devices}", "--trainer.accelerator=cpu",
        "--trainer.strategy=ddp_find_unused_parameters_true",
        "--trainer.max_steps=3", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
        '--trainer.callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
        '"init_args": {"dirpath": "' + str(tmp_path / "checkpoints") + '", "save_last": true, "every_n_train_steps": 3}}]',
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_of_one_process_train_through_the_slurm_environment(tmp_path, shapes_urls):
    port = free_port()
    command = fit_command(tmp_path, shapes_urls, num_nodes=2, devices=1)
    ranks = [
        subprocess.Popen(command, cwd=tmp_path, env=slurm_env(rank, rank, 2, 2, 1, port),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(2)
    ]
    outputs = [rank.communicate(timeout=600)[0] for rank in ranks]
    for rank, output in zip(ranks, outputs):
        assert rank.returncode == 0, output[-4000:]
    # each process is a node of its own: global rank = node rank, world size 2
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in outputs[0] and "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1], outputs[0][-3000:]
    assert torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 3


@pytest.mark.parametrize(
    "tasks, trainer, message",
    [
        # 2 tasks a node, 1 device: Lightning's own check (DDP only) would let each task train alone
        ((1, 2), (1, 1), "--ntasks-per-node=2: pass --trainer.num_nodes=1 --trainer.devices=2"),
        ((2, 1), (1, 1), "--nodes=2 and --ntasks-per-node=1: pass --trainer.num_nodes=2 --trainer.devices=1"),
    ],
)
def test_devices_or_nodes_that_disagree_with_slurm_fail_at_start_up(tmp_path, shapes_urls, tasks, trainer, message):
    nnodes, ntasks_per_node = tasks
    num_nodes, devices = trainer
    env = slurm_env(0, 0, nnodes * ntasks_per_node, nnodes, ntasks_per_node, free_port())
    result = subprocess.run(fit_command(tmp_path, shapes_urls, num_nodes, devices), cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]  # one message
    assert not (tmp_path / "checkpoints").exists()  # it stopped before training


def test_fit_in_the_batch_script_without_srun_is_refused(tmp_path, shapes_urls):
    env = slurm_env(0, 0, 2, 1, 2, free_port())
    del env["SLURM_STEP_ID"]  # the batch script's environment: a job of 2 tasks, but no step
    result = subprocess.run(fit_command(tmp_path, shapes_urls, 1, 2), cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "start it with `srun tessera fit ...`" in result.stderr, result.stderr[-3000:]
