"""Jobs from slurm/*.sbatch, rendered and submitted by `tessera submit`, on a real SLURM.

The session fixture starts a one-node cluster on this machine (slurm/local_cluster/start.sh:
Debian's slurm-wlm and munge, CPU-only tasks). The jobs train the tiny tokenizer on 32 px shards
as 2 CPU tasks joined by gloo, under DDP and under configs/trainer/fsdp.yaml (FSDP2, whose
checkpoints are directories): one runs to the end, one is sent SIGUSR1 mid-run and must requeue
itself, resume from its checkpoint and finish with every step logged once. Where the machine
cannot host the cluster (not root, no apt) they skip, unless TESSERA_REQUIRE_SLURM=1 (CI).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from lightning_modules.fsdp import SHARDED_METADATA

REPO = Path(__file__).parents[1]
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# each trainer the jobs run under: (config files after the tiny tokenizer's, `tessera fit` overrides)
TRAINERS = {
    "ddp": ([], ["--trainer.strategy=ddp_find_unused_parameters_true"]),
    # fp32 on CPU tasks, as the DDP jobs train: bf16 autocast would only slow them down
    "fsdp2": ([str(REPO / "configs/trainer/fsdp.yaml")], ["--trainer.precision=32"]),
}


@pytest.fixture(scope="session")
def slurm_cluster():
    """SLURM_CONF of the one-node test cluster, started if it is not up."""
    started = time.monotonic()
    result = subprocess.run(["bash", str(REPO / "slurm/local_cluster/start.sh")], capture_output=True, text=True, timeout=900)
    if result.returncode == 77:
        reason = result.stderr.strip().splitlines()[-1]
        if os.environ.get("TESSERA_REQUIRE_SLURM") == "1":
            pytest.fail(f"TESSERA_REQUIRE_SLURM=1, but {reason}")
        pytest.skip(reason)
    assert result.returncode == 0, f"slurm/local_cluster/start.sh failed:\n{result.stderr[-4000:]}"
    conf = re.search(r"export SLURM_CONF=(\S+)", result.stdout)[1]
    print(f"[slurm] cluster ready in {time.monotonic() - started:.0f}s")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", conf)  # sbatch exports it to the jobs, whose srun needs it too
        yield conf


def fit_args(shards: list[str], run_dir: Path, max_steps: int, checkpoint_every: int, trainer: str) -> list[str]:
    """`tessera fit` overrides: the tiny tokenizer on 32 px shards as 2 gloo ranks under `trainer`, a
    checkpoint every `checkpoint_every` steps, and a CSV log of every step (flushed at once, so a
    killed run keeps it)."""
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
              "init_args": {"save_dir": str(run_dir), "name": "csv", "flush_logs_every_n_steps": 1}}
    checkpoints = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"save_last": True, "every_n_train_steps": checkpoint_every}}]
    return [
        "--model.init_args.autoencoder.image_size=32", "--model.init_args.loss.disc_start=2",
        "--data=datamodules.caption_image.CaptionImageDataModule",
        f"--data.train_shards={shards[0]}", f"--data.val_shards={shards[2]}",
        "--data.image_size=32", "--data.batch_size=4", "--data.num_workers=0",
        *TRAINERS[trainer][1],
        f"--trainer.max_steps={max_steps}", "--trainer.limit_val_batches=0",
        "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        f"--trainer.logger={json.dumps(logger)}", f"--trainer.callbacks={json.dumps(checkpoints)}",
    ]


def submit(cwd: Path, run_dir: Path, args: list[str], *options: str, path: Path = Path(sys.executable).parent,
           trainer: str = "ddp") -> str:
    """`tessera submit` of the tiny tokenizer config (and `trainer`'s) as 2 CPU tasks on one node (or
    `options`); the job id."""
    options = options or (str(REPO / "configs/tokenizer/tiny_shapes.yaml"), *TRAINERS[trainer][0], "--tasks-per-node=2")
    command = [
        sys.executable, "-m", "tessera.commands.cli", "submit", *options,
        "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
        f"--run-dir={run_dir}", f"--setup=export PATH={shlex.quote(str(path))}:$PATH",
        "--args", *args,
    ]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return re.search(r"\[submit\] job (\d+)", result.stdout)[1]


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ...): no accounting database needed."""
    result = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True)
    return dict(re.findall(r"(\w+)=(\S*)", result.stdout))


def wait_for_state(job_id: str, states: set[str], timeout: float, output: Path) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info["JobState"] in states:
            return info
        if info["JobState"] in {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}:
            break
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    log = output.read_text()[-6000:] if output.exists() else "(no output file)"
    pytest.fail(f"job {job_id} is {info['JobState']} (reason {info.get('Reason')}), not {states}:\n{log}")


def saved_step(checkpoint: Path) -> int:
    """The global step of a checkpoint: a .ckpt file, or an FSDP2 checkpoint directory's meta.pt."""
    return torch.load(checkpoint / SHARDED_METADATA if checkpoint.is_dir() else checkpoint, weights_only=True)["global_step"]


def logged_steps(run_dir: Path) -> list[int]:
    """The `step` of every train/loss row in every CSV log of the run (one version per launch)."""
    steps = []
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with path.open() as file:
            steps += [int(row["step"]) for row in csv.DictReader(file) if row.get("train/loss")]
    return steps


@pytest.mark.parametrize("trainer", TRAINERS)
def test_a_training_job_of_two_cpu_tasks_completes(slurm_cluster, tmp_path, shapes_urls, trainer):
    run_dir = tmp_path / "run"
    job_id = submit(tmp_path, run_dir, fit_args(shapes_urls, run_dir, max_steps=4, checkpoint_every=4, trainer=trainer),
                    trainer=trainer)
    output = run_dir / f"slurm-{job_id}.out"
    wait_for_state(job_id, {"COMPLETED"}, timeout=300, output=output)

    log = output.read_text()
    assert "`Trainer.fit` stopped: `max_steps=4` reached" in log, log[-3000:]
    # both tasks joined one process group of 2, one per SLURM task
    assert "distributed_backend=gloo" in log and "All distributed processes registered" in log, log[-3000:]
    assert saved_step(run_dir / "checkpoints/last.ckpt") == 4
    assert (run_dir / "checkpoints/last.ckpt").is_dir() == (trainer == "fsdp2")  # FSDP2's shards, one file per rank
    assert sorted(logged_steps(run_dir)) == [0, 1, 2, 3]


@pytest.mark.parametrize("trainer", TRAINERS)
def test_a_job_signalled_mid_run_requeues_itself_and_resumes_where_it_stopped(slurm_cluster, tmp_path, shapes_urls,
                                                                                trainer):
    """SIGUSR1, as SLURM sends it 90 s before the time limit: a checkpoint, a requeue, a resume."""
    run_dir, max_steps = tmp_path / "run", 40
    # no checkpoint before the end but the one the signal makes: the resume can only come from it
    args = fit_args(shapes_urls, run_dir, max_steps=max_steps, checkpoint_every=max_steps, trainer=trainer)
    job_id = submit(tmp_path, run_dir, args, trainer=trainer)
    output = run_dir / f"slurm-{job_id}.out"

    deadline = time.monotonic() + 180
    while len(logged_steps(run_dir)) < 3:  # training has started: the signal lands mid-run
        assert time.monotonic() < deadline and job_info(job_id)["JobState"] in {"PENDING", "RUNNING"}, \
            output.read_text()[-4000:] if output.exists() else job_info(job_id)
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)

    # a requeued job passes through COMPLETING and then waits PENDING for a BeginTime about two
    # minutes on (the node's clean-up): start it as soon as it is back in the queue
    deadline = time.monotonic() + 120
    info = job_info(job_id)
    while not (info["Restarts"] == "1" and info["JobState"] in {"PENDING", "RUNNING", "COMPLETED"}):
        assert time.monotonic() < deadline, f"job {job_id} was not requeued: {info}\n{output.read_text()[-4000:]}"
        time.sleep(0.5)
        info = job_info(job_id)
    if info["JobState"] == "PENDING":
        # slurmd revokes the killed run's credential at a whole second and refuses the job's new one
        # if it is issued within that second ("Killing non-startable batch job: Job credential
        # revoked"): start it in a later second
        time.sleep(2)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
    wait_for_state(job_id, {"COMPLETED"}, timeout=300, output=output)

    log = output.read_text()
    assert "restart 0," in log and "restart 1," in log, log[-4000:]  # SLURM_RESTART_COUNT of each run
    second_run = log[log.index("restart 1,"):]
    assert re.search(r"Restoring states from the checkpoint path at \S+requeue\.ckpt", second_run), second_run[-4000:]
    assert f"`Trainer.fit` stopped: `max_steps={max_steps}` reached" in second_run
    assert saved_step(run_dir / "checkpoints/last.ckpt") == max_steps
    # every step logged exactly once across both runs' CSV logs: none lost, none trained twice
    steps = Counter(logged_steps(run_dir))
    assert sorted(steps) == list(range(max_steps)) and set(steps.values()) == {1}, steps


def test_a_tokenize_job_signalled_in_its_batch_script_requeues_itself(slurm_cluster, tmp_path):
    """The tokenize and evaluate templates: SIGUSR1 goes to the batch script (B:), which requeues."""
    fake = tmp_path / "bin"  # a `tessera` that only waits: the script's trap is under test, not tokenize
    fake.mkdir()
    (fake / "tessera").write_text('#!/bin/sh\necho "tessera $*"\nexec sleep 120\n')
    (fake / "tessera").chmod(0o755)
    run_dir = tmp_path / "run"
    job_id = submit(tmp_path, run_dir, ["--out", "tokens"], "--job=tokenize", path=fake)
    output = run_dir / f"slurm-{job_id}.out"
    try:
        deadline = time.monotonic() + 60
        while "tessera tokenize" not in (output.read_text() if output.exists() else ""):
            assert time.monotonic() < deadline, job_info(job_id)
            time.sleep(0.5)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
        deadline = time.monotonic() + 60
        while job_info(job_id)["Restarts"] == "0":
            assert time.monotonic() < deadline, f"{job_info(job_id)}\n{output.read_text()}"
            time.sleep(0.5)
        assert "[slurm] time limit near: requeueing" in output.read_text()
    finally:
        subprocess.run(["scancel", job_id])
