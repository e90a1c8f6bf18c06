"""`tessera submit`: the scripts it renders from slurm/*.sbatch, and the start-up check that the
trainer's processes are the SLURM job's tasks. Jobs on a real SLURM are in test_slurm.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tessera.commands.cli import build_parser
from tessera.commands.submit import check_slurm_layout, job_script, render

REPO = Path(__file__).parents[1]
TOKENIZER = str(REPO / "configs/tokenizer/tiny_shapes.yaml")


def script(*argv: str, cwd: Path = Path("/jobs")) -> str:
    return job_script(build_parser().parse_args(["submit", *argv]), cwd)[0]


def directives(text: str) -> list[str]:
    return re.findall(r"^#SBATCH (\S+)", text, flags=re.M)


def test_a_gpu_job_has_a_task_per_gpu_and_the_trainer_the_same_numbers():
    text = script(TOKENIZER, "--nodes=4", "--gpus-per-node=8", "--time=2-00:00:00", "--partition=gpu", "--account=vision",
                  "--args", "--trainer.max_steps=100")
    assert directives(text)[:4] == ["--job-name=tessera-tokenizer", "--nodes=4", "--ntasks-per-node=8", "--cpus-per-task=8"]
    assert {"--gres=gpu:8", "--partition=gpu", "--account=vision", "--time=2-00:00:00",
            "--signal=USR1@90", "--requeue", "--open-mode=append"} <= set(directives(text))
    assert re.search(r"srun --kill-on-bad-exit=1 tessera fit --config \S+tiny_shapes.yaml \\\n\s+--trainer.num_nodes=4 "
                     r"--trainer.devices=8 --trainer.accelerator=gpu", text)
    assert "--trainer.default_root_dir=/jobs/runs/tokenizer_tiny --trainer.max_steps=100" in text  # the config's, under the cwd
    assert "{{" not in text


def test_a_cpu_job_has_no_gres_and_what_is_not_given_is_left_to_sbatch():
    text = script(TOKENIZER, "--gpus-per-node=0", "--tasks-per-node=2", "--cpus-per-task=1", "--run-dir=/scratch/r1")
    assert "--ntasks-per-node=2" in directives(text) and "--trainer.devices=2 --trainer.accelerator=cpu" in text
    assert not [d for d in directives(text) if d.startswith(("--gres", "--partition", "--account", "--time"))]
    assert "--output=/scratch/r1/slurm-%j.out" in directives(text)
    assert "\n\n#SBATCH" not in text  # the empty optional directives leave no blank line among the others


def test_the_template_follows_the_model_class_and_the_other_jobs_take_their_options():
    assert "--job-name=tessera-prior" in directives(script(str(REPO / "configs/prior/tiny_shapes.yaml")))
    text = script("--job=tokenize", "--gpus-per-node=4", "--args", "--tokenizer", "t.ckpt", "--shards", "d/{0..9}.tar", "--out", "tok")
    assert "srun --kill-on-bad-exit=1 tessera tokenize --workers=8 --tokenizer t.ckpt --shards 'd/{0..9}.tar' --out tok &" in text
    assert "--signal=B:USR1@90" in directives(text)
    assert "tessera evaluate coco --prior p.ckpt" in script("--job=evaluate_coco", "--args", "--prior", "p.ckpt")


@pytest.mark.parametrize("config", sorted(
    str(path) for family in ("tokenizer", "prior", "fine_stage", "pixel", "llm") for path in (REPO / "configs" / family).glob("*.yaml")
))
def test_every_training_config_submits_with_the_template_of_its_stage(config):
    stage = "tokenizer" if "/tokenizer/" in config else "prior"
    assert f"--job-name=tessera-{stage}" in directives(script(config))


@pytest.mark.parametrize("argv, message", [
    ((TOKENIZER, "--gpus-per-node=8", "--tasks-per-node=4"), "one task per GPU"),
    (("--job=prior",), "needs its config files"),
    (("--job=tokenize", TOKENIZER), "takes no config files"),
    ((str(REPO / "configs/data/shapes.yaml"),), "cannot tell the job"),
])
def test_a_job_that_cannot_run_is_refused_before_sbatch(argv, message):
    with pytest.raises(SystemExit, match=message):
        script(*argv)


def test_a_template_field_without_a_value_is_an_error():
    assert render("a={{a}}\n{{empty}}\nb\n", {"a": "1", "empty": ""}) == "a=1\nb\n"
    with pytest.raises(KeyError, match="missing"):
        render("{{missing}}", {})


SLURM_2x2 = {"SLURM_JOB_NAME": "t", "SLURM_NTASKS": "4", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "2",
             "SLURM_STEP_ID": "0", "SLURM_PROCID": "0"}


def test_the_trainer_layout_must_be_the_slurm_tasks():
    check_slurm_layout(2, 2, SLURM_2x2)
    check_slurm_layout(1, 1, {})  # not under SLURM
    check_slurm_layout(1, 1, {"SLURM_JOB_NAME": "t", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"})
    with pytest.raises(SystemExit, match=r"num_nodes=2 x devices=1 .* --ntasks-per-node=2: pass --trainer.num_nodes=2 --trainer.devices=2"):
        check_slurm_layout(2, 1, SLURM_2x2)
    with pytest.raises(SystemExit, match="--nodes=2"):
        check_slurm_layout(1, 2, SLURM_2x2)
    with pytest.raises(SystemExit, match="start it with `srun tessera fit"):
        check_slurm_layout(2, 2, {k: v for k, v in SLURM_2x2.items() if k != "SLURM_STEP_ID"})
    with pytest.raises(SystemExit) as other_rank:  # one message: the other ranks exit without one
        check_slurm_layout(2, 1, {**SLURM_2x2, "SLURM_PROCID": "3"})
    assert other_rank.value.code == 1
